"""tailgen.module"""
