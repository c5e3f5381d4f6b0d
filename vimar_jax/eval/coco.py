"""The COCO-80 object categories and the words that name them, for CHAIR on COCO.

Our own table (CHAIR, Rohrbach et al. 2018, uses a synonym list of the same kind): each category lists
the phrases that mention it, in the singular. Captions are lower-cased, split into letter runs, each word
singularised (`singular`), and matched longest phrase first, so "hot dog" is one mention of hot dog (not a
dog), "teddy bear" one of teddy bear, "baseball bat" one of baseball bat. `NON_OBJECT_PHRASES` consume
words without naming an object ("tennis court", "toilet paper", "bus stop").
"""

from __future__ import annotations

import re

# COCO category id -> name (the 80 categories of instances_*.json).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

# Category -> phrases naming it (the category name itself is always included).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("people", "man", "woman", "boy", "girl", "child", "kid", "baby", "guy", "lady", "gentleman",
               "adult", "teenager", "teen", "toddler", "player", "skier", "surfer", "skateboarder",
               "snowboarder", "cyclist", "biker", "rider", "pedestrian", "worker", "chef", "officer",
               "policeman", "soldier", "passenger", "spectator", "catcher", "pitcher", "batter", "umpire",
               "bride", "groom", "customer", "tennis player", "baseball player", "father", "mother", "son",
               "daughter", "husband", "wife", "friend"),
    "bicycle": ("bike", "cycle", "bmx"),
    "car": ("automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe", "taxi",
            "taxicab", "limo", "limousine"),
    "motorcycle": ("motorbike", "motor bike", "motor cycle", "scooter", "moped", "dirt bike"),
    "airplane": ("plane", "aeroplane", "airliner", "jetliner", "jet", "aircraft", "jumbo jet"),
    "bus": ("school bus", "double decker", "trolleybus", "minibus"),
    "train": ("locomotive", "tram", "subway", "streetcar", "passenger train", "freight train"),
    "truck": ("pickup", "pickup truck", "lorry", "fire truck", "firetruck", "dump truck", "tow truck"),
    "boat": ("ship", "yacht", "sailboat", "kayak", "canoe", "ferry", "raft", "dinghy", "rowboat", "speedboat"),
    "traffic light": ("traffic signal", "stop light", "stoplight"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": ("meter",),
    "bench": ("pew",),
    "bird": ("pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "owl", "eagle", "hawk", "crow",
             "sparrow", "pelican", "penguin", "flamingo"),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup", "doggy"),
    "horse": ("pony", "foal", "stallion", "mare"),
    "sheep": ("lamb", "ram"),
    "cow": ("cattle", "bull", "calf", "ox"),
    "elephant": (),
    "bear": ("polar bear", "grizzly"),
    "zebra": (),
    "giraffe": (),
    "backpack": ("back pack", "rucksack", "knapsack"),
    "umbrella": ("parasol",),
    "handbag": ("hand bag", "purse"),
    "tie": ("necktie", "bow tie"),
    "suitcase": ("suit case", "luggage"),
    "frisbee": ("flying disc",),
    "skis": ("ski",),
    "snowboard": ("snow board",),
    "sports ball": ("ball", "football", "soccer ball", "baseball", "basketball", "tennis ball", "volleyball",
                    "softball", "beach ball"),
    "kite": (),
    "baseball bat": ("bat",),
    "baseball glove": ("glove", "mitt", "baseball mitt"),
    "skateboard": ("skate board",),
    "surfboard": ("surf board",),
    "tennis racket": ("racket", "racquet", "tennis racquet"),
    "bottle": (),
    "wine glass": ("wineglass", "champagne glass"),
    "cup": ("mug", "coffee cup", "tea cup", "teacup"),
    "fork": (),
    "knife": ("butter knife",),
    "spoon": ("teaspoon",),
    "bowl": (),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "hamburger", "cheeseburger", "panini"),
    "orange": ("tangerine", "clementine"),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog", "frankfurter"),
    "pizza": (),
    "donut": ("doughnut",),
    "cake": ("cupcake", "cheesecake"),
    "chair": ("stool", "armchair", "highchair", "high chair"),
    "couch": ("sofa", "loveseat", "love seat", "settee"),
    "potted plant": ("plant", "houseplant", "house plant", "flower pot", "flowerpot"),
    "bed": (),
    "dining table": ("table", "kitchen table", "coffee table", "picnic table"),
    "toilet": ("toilet seat", "toilet bowl"),
    "tv": ("television", "monitor", "tv monitor"),
    "laptop": ("laptop computer", "notebook computer"),
    "mouse": ("computer mouse",),
    "remote": ("remote control",),
    "keyboard": (),
    "cell phone": ("cellphone", "phone", "mobile phone", "smartphone", "smart phone", "iphone", "telephone"),
    "microwave": ("microwave oven",),
    "oven": ("stove",),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddy", "stuffed bear"),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer"),
    "toothbrush": ("tooth brush",),
}

# Phrases that contain an object word but name none (matched like synonyms, yielding no mention).
NON_OBJECT_PHRASES = (
    "baseball field", "baseball game", "baseball diamond", "baseball uniform", "baseball cap", "baseball team",
    "baseball stadium", "football field", "football game", "soccer field", "soccer game", "tennis court",
    "basketball court", "toilet paper", "bus stop", "bus station", "train station", "train track",
    "orange juice", "dvd player", "cd player", "record player", "apple logo",
)

_IRREGULAR = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse", "geese": "goose",
    "oxen": "ox", "knives": "knife", "calves": "calf", "halves": "half", "shelves": "shelf", "leaves": "leaf",
    "wolves": "wolf", "buses": "bus", "skis": "ski", "teeth": "tooth", "feet": "foot", "policemen": "policeman",
    "gentlemen": "gentleman",
}


def singular(word: str) -> str:
    """Rule-based singular of a lower-case English noun ("dogs" -> "dog", "benches" -> "bench",
    "puppies" -> "puppy", "people" -> "person"); words that are not plurals come back unchanged."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y" if len(word) > 4 else word[:-1]
    if word.endswith(("sses", "xes", "ches", "shes", "zzes")):
        return word[:-2]
    return word[:-1]


def words(text: str) -> list[str]:
    """Lower-case letter runs of `text`, singularised."""
    return [singular(w) for w in re.findall(r"[a-z]+", text.lower())]


def _phrase_table() -> dict[tuple[str, ...], str | None]:
    table: dict[tuple[str, ...], str | None] = {}
    for category, phrases in SYNONYMS.items():
        for phrase in (category, *phrases):
            key = tuple(words(phrase))
            if table.get(key, category) != category:
                raise AssertionError(f"phrase {phrase!r} names both {table[key]!r} and {category!r}")
            table[key] = category
    for phrase in NON_OBJECT_PHRASES:
        table[tuple(words(phrase))] = None
    return table


PHRASES = _phrase_table()
_MAX_PHRASE = max(len(k) for k in PHRASES)


def find_objects(text: str) -> list[tuple[str, str]]:
    """Every object mention in `text` as (matched phrase, category), in order, longest phrase first."""
    ws = words(text)
    out = []
    i = 0
    while i < len(ws):
        for n in range(min(_MAX_PHRASE, len(ws) - i), 0, -1):
            key = tuple(ws[i:i + n])
            if key in PHRASES:
                if PHRASES[key] is not None:
                    out.append((" ".join(key), PHRASES[key]))
                i += n
                break
        else:
            i += 1
    return out
