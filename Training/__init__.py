"""Training and evaluation of RobustMedSAM's mask decoder (see Training/README.md).

* :mod:`Training.datasets`: MedSegBench ``.npz`` files, image/mask folders and 3D volumes as 2D slices;
  clean/degraded training pairs with seeded prompts and corruptions.
* :mod:`Training.losses`: the RobustSAM objective (focal + Dice + token/feature consistency) and the
  MedicoSAM iterative-prompting loss.
* :mod:`Training.adapters`: Medical-SAM-Adapter-style bottleneck adapters for the image encoder.
* :mod:`Training.train_decoder`: the trainer's command line and loop (single process or ``torchrun``), with
  :mod:`~Training.train_config` (options, checks, data), :mod:`~Training.train_model` (start model, trainable
  parameters, mixed precision, outputs), :mod:`~Training.objectives` (the training forward),
  :mod:`~Training.distributed` (torchrun, BatchNorm statistics under DDP), :mod:`~Training.train_state`
  (atomic state, exact resume) and :mod:`~Training.train_logging` (CSV, TensorBoard, progress).
* :mod:`Training.evaluate`: Dice per dataset x corruption x prompt for several models.
* :mod:`Training.cli_common`: data-source options, output-folder check and progress bar of both CLIs.
"""
