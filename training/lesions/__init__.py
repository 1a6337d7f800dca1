"""Training of the lesion network (MA, HE, EX, SE) on IDRiD."""
