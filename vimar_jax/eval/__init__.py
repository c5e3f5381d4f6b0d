"""vimar_jax.eval"""
