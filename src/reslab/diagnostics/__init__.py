"""Diagnostics: small measurements that read the trunk's taps and return arrays."""
