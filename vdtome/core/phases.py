"""The phases of a pipeline call that timing and memory are reported for, and that a method may act in."""

TEXT_ENCODING = "text_encoding"
DENOISING = "denoising"
VAE_DECODE = "vae_decode"
END_TO_END = "end_to_end"
PHASES = (TEXT_ENCODING, DENOISING, VAE_DECODE, END_TO_END)
