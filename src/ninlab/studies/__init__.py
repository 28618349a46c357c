"""The studies: several questions to the accountant (and the trainer) answered together, as one
result a visual or a command shows: the largest batch and the memory line around it, a report's
data, a comparison of variants."""
