"""Expert offloading: the per-layer error-bound policy, the compressed host store, the device cache and prefetch."""
