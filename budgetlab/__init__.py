"""budgetlab: split an annotation budget between SFT and preference data, and measure it."""

from budgetlab.api import Lab  # the Python API: `from budgetlab import Lab`
from budgetlab.version import SCHEMA_VERSION, __version__

__all__ = ["Lab", "__version__", "SCHEMA_VERSION"]
