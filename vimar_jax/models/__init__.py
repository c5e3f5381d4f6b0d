"""vimar_jax.models"""
