"""One comparison: the request and its resolved settings, the engine that runs baseline and
accelerated calls under the protocol, fidelity, video files and the text report."""
