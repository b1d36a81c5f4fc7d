"""Token merging (ToMe, PiToMe) and dropping (MustDrop, FastV). May import ``vision``."""
