"""The tiny world's cross-model policy "b": like `tiny_policy` ("a") but with a Qwen2-style decoder (q/k/v
biases, RoPE theta 1e6) and the Qwen-like tokenizer "b" (ChatML template, no BOS, `<|im_end|>` as EOS).

`python train/train_sft.py --config configs/tiny_policy_qwen.py --workdir DIR --clip CLIP_DIR`.
"""

import ml_collections

from configs import tiny_policy


def get_config() -> ml_collections.ConfigDict:
    c = tiny_policy.get_config()
    c.seed = 1
    c.model.update(text_type="qwen2", tokenizer="b", rope_theta=1e6, rms_norm_eps=1e-6)
    c.data.train_seed = 3          # its own training scenes (still never the eval seed)
    return c
