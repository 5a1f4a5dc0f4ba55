"""Torch-free generation runtime over an attanchor-export artifact folder."""
