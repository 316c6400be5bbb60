"""The seed papers' networks that MONAI does not ship, in plain torch, 2D and 3D.

One file per network family; :mod:`fedpacs.common.models` registers them. Each family
module holds the network class (keyword-only arguments, so a MONAI bundle's
``network_def`` can rebuild it) and ``task_kwargs(task)``: the mapping from a
:class:`~fedpacs.common.tasks.TaskConfig` to those arguments.

Width mapping: ``task.width`` is the network's first-stage channel count, 64 in every
paper here (AlexNet, VGG-16, GoogLeNet's stem, the FCN-8s/SegNet VGG-16 encoders, the
ResNet stem of PSPNet); every other channel count scales with it (``c * width / 64``).
With width 64, 3 input channels and 1000 classes at 3x224x224 the classifiers have the
published (torchvision) parameter counts.
"""
