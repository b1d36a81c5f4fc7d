"""The vision-token workbench command line and run utilities.

Only this package imports every sibling package (``vision``, ``datasets``, ``tokenizers_img``,
``ar_gen``, ``compression``); they never import ``workbench``.
"""

__version__ = "0.1.0"
