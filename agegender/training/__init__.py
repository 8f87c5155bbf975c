"""Training: configuration, model, step, run state and the loop.

  config     four dataclasses, each default written once, and the recipes
  model      the dual-output Keras models
  trainer    the explicit training step under any tf.distribute strategy
  run_state  checkpoints, history, curves: what makes a run resumable
  loop       a Config to a trained, evaluated, exported model
"""
