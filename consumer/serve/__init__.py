"""`smsq serve`: Twilio's status callbacks, hosted MMS media, the dashboard, health, metrics.

`app.create_app(settings)` builds the Starlette application; every SQL statement it runs is
in `queries.py`; the pure rules (delivery status order, the chart) are plain modules.
"""
