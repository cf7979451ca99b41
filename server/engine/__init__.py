"""What drives the device: shape buckets, the attention inputs built without a host sync, launch and collect."""
