"""Training and evaluation of RobustMedSAM's mask decoder (see Training/README.md).

* :mod:`Training.datasets`: MedSegBench ``.npz`` files, image/mask folders and 3D volumes as 2D slices;
  clean/degraded training pairs with seeded prompts and corruptions.
* :mod:`Training.losses`: the RobustSAM objective (focal + Dice + token/feature consistency) and the
  MedicoSAM iterative-prompting loss.
* :mod:`Training.adapters`: Medical-SAM-Adapter-style bottleneck adapters for the image encoder.
* :mod:`Training.train_decoder`: the trainer (single process or ``torchrun``).
* :mod:`Training.evaluate`: Dice per dataset x corruption x prompt for several models.
"""
