"""agegender: age and gender from UTKFace face crops, streamed from TFRecords."""

__version__ = '0.1.0'
