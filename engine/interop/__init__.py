"""Other tools' formats, written and read by our code: Hugging Face Llama folders and GGUF."""

from .gguf_export import export_gguf
from .hf_export import export_hf
from .hf_format import HFFormatError
from .hf_import import import_hf

__all__ = ["HFFormatError", "export_gguf", "export_hf", "import_hf"]
