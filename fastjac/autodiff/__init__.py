"""Tangent evaluations of decoders that torch.func would otherwise push (see :mod:`.stacked`)."""
