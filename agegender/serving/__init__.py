"""Use: evaluation, the serving SavedModel, TFLite and prediction on photos.

  evaluate  metrics by group, baselines, plots
  export    the SavedModel taking encoded image bytes
  lite      the TFLite models and a LiteRT runner
  predict   age and gender for files, crops or whole photos
"""
