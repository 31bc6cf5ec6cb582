"""The Linux density benchmark's Python program: imports much of the standard library, as a
large Python program starting up does, so the guest reads byte-compiled modules, extension
modules and the shared libraries they load from the root image."""
import importlib
import sys

MODULES = """
abc argparse ast asyncio base64 bdb binascii bisect bz2 calendar cmd code codecs collections
colorsys concurrent.futures configparser contextlib copy csv ctypes dataclasses datetime
decimal difflib dis doctest email.mime.multipart email.parser enum filecmp fileinput fnmatch
fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq hmac html.parser
http.client http.cookiejar http.server imaplib inspect io ipaddress itertools json logging.config
logging.handlers lzma mailbox math mimetypes multiprocessing netrc numbers operator optparse
pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile pstats py_compile
queue quopri random re reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil
signal smtplib socket socketserver sqlite3 ssl statistics string stringprep struct subprocess
symtable tabnanny tarfile tempfile textwrap threading timeit tokenize tomllib trace traceback
typing unicodedata unittest unittest.mock urllib.parse urllib.request uuid warnings wave
weakref webbrowser wsgiref.simple_server xml.dom.minidom xml.etree.ElementTree xml.sax
xmlrpc.client zipapp zipfile zipimport zoneinfo
""".split()

failed = []
for name in MODULES:
    try:
        importlib.import_module(name)
    except Exception as e:  # a module that cannot load here is named, the rest still load
        failed.append(f"{name} ({type(e).__name__}: {e})")
print(f"density: python {sys.version.split()[0]} imported {len(sys.modules)} modules", flush=True)
for f in failed:
    print(f"density: python could not import {f}")
