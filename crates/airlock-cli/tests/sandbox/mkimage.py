# Builds OCI images for the image tests: an OCI image layout (directory or
# tarball) or a `docker save` tarball, from a JSON description on stdin:
#   {"format": "oci" | "docker", "archive": "tar" | "dir", "gzip": bool,
#    "tamper": null | layer index (one byte of that blob flipped after the
#              digests are computed),
#    "layers": [[entry, ...], ...]}
# entry: {"path": p, "type": "file" | "dir" | "symlink" | "hardlink" |
#         "char" | "fifo" | "host", "data": str, "mode": int, "target": str,
#         "host": host path (a file, or a directory copied whole, skipping
#         "exclude" names), "pax_bytes": n (a PAX comment record that long)}
# or {"type": "preset", "name": "host-python"}: the host's python3, its
# standard library and the libraries they load, laid out as Debian does.
# Writes the image to argv[1] and prints the configuration's digest.
import gzip, hashlib, io, json, os, sys, tarfile

spec = json.load(sys.stdin)
out = sys.argv[1]


def add_host(t, path, host, exclude):
    st = os.lstat(host)
    ti = tarfile.TarInfo(path)
    ti.mode = st.st_mode & 0o7777
    if os.path.islink(host):
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.readlink(host)
        t.addfile(ti)
    elif os.path.isdir(host):
        ti.type = tarfile.DIRTYPE
        t.addfile(ti)
        for name in sorted(os.listdir(host)):
            if name in exclude:
                continue
            add_host(t, path + "/" + name, os.path.join(host, name), exclude)
    else:
        ti.size = st.st_size
        with open(host, "rb") as f:
            t.addfile(ti, f)


def host_python():
    ver = "python%d.%d" % sys.version_info[:2]
    real = os.path.realpath
    out = [
        {"path": "usr", "type": "dir"},
        {"path": "usr/bin", "type": "dir"},
        {"path": "usr/bin/" + ver, "type": "host", "host": real("/usr/bin/" + ver)},
        {"path": "usr/bin/python3", "type": "symlink", "target": ver},
        {"path": "usr/lib/" + ver, "type": "host", "host": "/usr/lib/" + ver,
         "exclude": ["test", "__pycache__", "idlelib", "tkinter", "ensurepip"]},
        {"path": "lib", "type": "symlink", "target": "usr/lib"},
        {"path": "lib64", "type": "symlink", "target": "usr/lib64"},
        {"path": "usr/lib64", "type": "dir"},
        {"path": "usr/lib64/ld-linux-x86-64.so.2", "type": "host",
         "host": real("/lib64/ld-linux-x86-64.so.2")},
        {"path": "etc", "type": "dir"},
        {"path": "etc/os-release", "data": "NAME=airlock-python-image\n"},
    ]
    for lib in ["libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1", "libffi.so.8"]:
        out.append({"path": "usr/lib/x86_64-linux-gnu/" + lib, "type": "host",
                    "host": real("/lib/x86_64-linux-gnu/" + lib)})
    return out


def layer(entries):
    entries = [x for e in entries
               for x in (host_python() if e.get("type") == "preset" else [e])]
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            kind = e.get("type", "file")
            if kind == "host":
                add_host(t, e["path"], e["host"], set(e.get("exclude", [])))
                continue
            ti = tarfile.TarInfo(e["path"])
            ti.mode = e.get("mode", 0o755 if kind == "dir" else 0o644)
            if "pax_bytes" in e:
                ti.pax_headers = {"comment": "x" * e["pax_bytes"]}
            data = None
            if kind == "file":
                data = e.get("data", "").encode()
                ti.size = len(data)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = e["target"]
            elif kind == "hardlink":
                ti.type = tarfile.LNKTYPE
                ti.linkname = e["target"]
            elif kind == "char":
                ti.type = tarfile.CHRTYPE
                ti.devmajor, ti.devminor = 1, 3
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return b.getvalue()


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


raw = [layer(l) for l in spec["layers"]]
blobs = [gzip.compress(r, compresslevel=1, mtime=0) if spec.get("gzip") else r for r in raw]
config = json.dumps({
    "architecture": "amd64",
    "os": "linux",
    "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
    "rootfs": {"type": "layers", "diff_ids": [sha(r) for r in raw]},
}).encode()
digests = [sha(b) for b in blobs]
tamper = spec.get("tamper")
if tamper is not None:
    b = bytearray(blobs[tamper])
    b[len(b) // 2] ^= 0x01
    blobs[tamper] = bytes(b)

files = {}
if spec["format"] == "oci":
    mt = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if spec.get("gzip") else "")
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": mt, "digest": d, "size": len(b)}
                   for d, b in zip(digests, blobs)],
    }).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": sha(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": "test"}}],
    }).encode()
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    files["index.json"] = index
    for b in [config, manifest]:
        files["blobs/sha256/" + sha(b)[7:]] = b
    for d, b in zip(digests, blobs):
        files["blobs/sha256/" + d[7:]] = b
else:
    names = []
    for i, b in enumerate(blobs):
        names.append(f"layer{i}/layer.tar")
        files[names[-1]] = b
    files[sha(config)[7:] + ".json"] = config
    files["manifest.json"] = json.dumps(
        [{"Config": sha(config)[7:] + ".json", "RepoTags": ["test:latest"], "Layers": names}]
    ).encode()

if spec.get("archive", "tar") == "dir":
    for name, b in files.items():
        p = os.path.join(out, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b)
else:
    with tarfile.open(out, "w") as t:
        for name, b in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(b)
            t.addfile(ti, io.BytesIO(b))
print(sha(config))
