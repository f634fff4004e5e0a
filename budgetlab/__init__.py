"""budgetlab: split an annotation budget between SFT and preference data, and measure it."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
