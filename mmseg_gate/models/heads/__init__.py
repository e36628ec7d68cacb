from .pixel_classifier_head import PixelClassifierHead

__all__ = ['PixelClassifierHead']
