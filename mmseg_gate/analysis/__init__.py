"""The GATE guideline: content shift measured (content_shift), seen (pictures) and
reconstructed (reconstruction)."""
