"""``python -m appliance.eventsdoc > docs/events.md``: print the event catalogue.

Modules register the events they emit when they are imported; the service
tree (``appliance.tap``) imports every one of them, so importing it here
gathers the whole catalogue. Nothing imports this module: it sits above
everything it reads.
"""

import appliance.tap  # noqa: F401  (imports every module that registers events)
from appliance import events


def main():
    print(events.catalogue_markdown(), end="")


if __name__ == "__main__":
    main()
