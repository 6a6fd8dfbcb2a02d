"""tailgen.guidance"""
