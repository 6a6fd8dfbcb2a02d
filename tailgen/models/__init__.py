"""tailgen.models"""
