"""vimar_jax.decode"""
