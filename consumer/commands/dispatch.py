from __future__ import annotations

import argparse

from consumer.dispatch import loop, sharing
from consumer.migrate import require_current_schema
from consumer.settings import ConfigError, Settings
from consumer.signals import StopSignal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Paces every configured sender (TWILIO_PHONE_NUMBER or "
                     "TWILIO_MESSAGING_SERVICE_SID, and SMSQ_SENDERS) at TWILIO_SMS_RATE "
                     "segments/s; run several copies as hot standbys. Stops cleanly on "
                     "SIGTERM/SIGINT: unsent claimed rows go back to pending.")


def main(settings: Settings, args: argparse.Namespace) -> int:
    require_current_schema(settings.database_dsn)
    check_can_send(settings)
    loop.run(settings, StopSignal().install())
    return 0


def check_can_send(settings: Settings) -> None:
    """Refuse to start when nothing could be sent: no credentials for real Twilio, no sender."""
    if not settings.uses_twilio_sandbox and not (settings.twilio_account_sid
                                                 and settings.twilio_auth_token):
        raise ConfigError("TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN: required to send through "
                          "Twilio (or point TWILIO_API_URL at a sandbox such as smsq fake-twilio)")
    if not sharing.paced_senders(settings):
        raise ConfigError("TWILIO_PHONE_NUMBER / TWILIO_MESSAGING_SERVICE_SID: set one of them "
                          "(or SMSQ_SENDERS), the number or service messages are sent from")
