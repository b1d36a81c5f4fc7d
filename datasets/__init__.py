"""Data pipelines: procedural shapes, image folders, electron-microscopy volumes.

Dependency rule: ``datasets`` imports none of the workbench's sibling packages. Note that this
package shadows Hugging Face ``datasets``; the workbench lives in its own virtual environment.
"""
