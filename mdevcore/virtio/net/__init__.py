"""virtio-net for parents to reuse (5.1): the device type, its control queue,
its datapath and the frame backends it can be wired to.

- ``device``: VirtioNetDevice (a VirtioPciDevice): features, config, queues
- ``control``: control virtqueue commands and the receive filter they set
- ``datapath``: TX chains -> frames, frames -> RX buffers (MRG_RXBUF)
- ``offload``: checksum/TSO features, TX header checks, RX header fitting
- ``backend``: where frames go: a UNIX datagram socket (pairs need no privileges)
- ``tap``: a TAP interface (in a network namespace) with the virtio_net_hdr passed through
- ``state``: the migration state and its checks
"""
