"""Pieces of the Image tab: prompt boxes, parameters, init image and mask, preview, gallery."""
