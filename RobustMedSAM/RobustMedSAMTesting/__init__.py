"""The module's self-test for the Slicer application (not GUI-free, unlike RobustMedSAMLogic)."""
