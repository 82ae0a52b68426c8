"""The web app's logic, testable without a server: form parsing, the result page, serving guards,
limits, cancellation. ``app.py`` only lays it out and wires it."""
