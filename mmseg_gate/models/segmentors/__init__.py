from .gate_encoder_decoder import GATEEncoderDecoder

__all__ = ['GATEEncoderDecoder']
