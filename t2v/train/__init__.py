"""Training groundwork for an embedded model that follows the prompt.

``world``: a small visual world of captioned clips (shapes, colours, motions, backgrounds), drawn with
numpy. ``checker``: decides colour, shape and motion of a clip from its pixels only. ``train``: trains
the tiny architecture family of ``t2v.modelgen`` on that world and saves a diffusers model folder.
"""
