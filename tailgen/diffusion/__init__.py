"""tailgen.diffusion"""
