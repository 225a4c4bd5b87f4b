"""One module per op: its torch.library registrations (fake + autograd), its typed
wrapper, and its pure-PyTorch reference."""
