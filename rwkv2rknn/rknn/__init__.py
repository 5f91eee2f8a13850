"""The RKNN back end: the rknn-toolkit2 wrapper, the build service and its cache, calibration, the columns rewrite."""
