"""cuda_restore"""
