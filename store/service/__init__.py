"""The store service: a store on one host served over ZeroMQ to agents and tools on other hosts.

``server.StoreServer`` owns the LMDB store (``launch/serve_store.py`` runs it); ``client.RemoteStore``
is its client and a ``store.StoreAPI``; ``wire`` is the message format, ``keys`` the CURVE key
folder, ``blobcache`` the per-host cache of fetched blobs, ``staging`` the service's upload area.
See docs/remote.md. Nothing here imports torch.
"""
