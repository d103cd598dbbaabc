"""busline: the reference bus-ticketing platform that Lookout observes.

It is instrumented only through `lookout.sdk` (and launched with `lookout.run`); nothing
in `lookout` imports it. Its services arrive with the busline issues; see docs/.
"""
