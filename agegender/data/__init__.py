"""Input: records to uint8 batches on the device.

  preprocess    encoded bytes or pixels to a uint8 SxSx3 image: one function for every stage
  shard_reader  the manifest's shards, damaged ones named
  pipeline      list shards -> interleave -> shuffle -> batch -> parse -> decode/resize -> prefetch
  service       the tf.data service: a dispatcher and workers that run the pipeline elsewhere
"""
