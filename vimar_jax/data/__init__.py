"""vimar_jax.data"""
