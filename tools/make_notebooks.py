"""Write the teaching notebooks from their source here (cells as plain text, easy to review).

Each builder returns a notebook's cells; ``BUILDERS`` maps notebook names to builders. Run
``python tools/make_notebooks.py [NAME ...]``, then ``python -m supermachine_jupyter notebook
notebooks/NAME.ipynb --write`` to store the outputs of a real run in the committed notebook.
A notebook whose cells are unchanged is left alone (its stored outputs are kept); ``--force``
rewrites it anyway. ``tests/test_notebooks.py`` checks that the committed notebooks are what
this file generates, carry outputs from a real run, and print what each lesson promises.
"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def hello_vm():
    md, code = new_markdown_cell, new_code_cell
    return [
        md("# 00 · Hello, VM\n\n"
           "**What you will learn**\n"
           "- run a notebook cell inside a hardware-isolated Linux microVM with `%%vm`;\n"
           "- keep a VM running across cells with `--name`, and stop it;\n"
           "- what happens on errors, timeouts and interrupts;\n"
           "- the same thing from Python with `Image` and `Vm`.\n\n"
           "Every `%%vm` cell's shell script runs inside its own Linux kernel, not on your "
           "machine: the guest has its own processes, memory and filesystem."),
        code("%load_ext supermachine_jupyter"),
        md("## A first cell in a VM\nThe first run boots a small Linux guest (a few seconds "
           "under software emulation). Output streams while the guest runs; the last line "
           "shows the exit status and timings."),
        code("%%vm\nuname -a\necho \"I am PID $$ in a VM with $(nproc) vCPU\"\nfree -m | head -2"),
        md("## Named VMs keep their state\nWith `--name`, the VM stays up after the cell, so "
           "the next cell sees the same filesystem and processes."),
        code("%%vm --name lab1 --memory 256\necho hello > /tmp/greeting\nhostname"),
        code("%%vm --name lab1\ncat /tmp/greeting\nls /tmp"),
        code("%vm list"),
        md("## Errors, timeouts, interrupts\nA non-zero exit is shown in the status line "
           "(add `--raise` to turn it into a cell error). `--timeout` kills a command that "
           "runs too long; the VM survives. The kernel's *interrupt* button does the same "
           "interactively: SIGINT, then SIGTERM, then SIGKILL to the guest command."),
        code("%%vm --name lab1\necho 'about to fail' >&2\nexit 3"),
        code("%%vm --name lab1 --timeout 2\necho 'sleeping for 60 s…'\nsleep 60"),
        code("%%vm --name lab1\necho 'still alive after the timeout'"),
        md("## The same from Python\n`Image.default()` is the embedded guest; "
           "`image.start(config)` returns a running `Vm`."),
        code("from supermachine_jupyter import Image, VmConfig\n\n"
             "config = VmConfig().with_memory_mib(256).with_vcpus(1)\n"
             "with Image.default().start(config) as vm:\n"
             "    print(vm)\n"
             "    result = vm.run('echo from python; cat /proc/cpuinfo | grep -c ^processor')\n"
             "    print(result)\n"
             "    print(result.stdout)"),
        code("%vm stop lab1"),
        md("## Exercises\n"
           "1. Start a VM with `--vcpus 2` and check `nproc` inside it.\n"
           "2. Write a file in a named VM, stop it with `%vm stop`, start it again: is the "
           "file still there? Why not? (Notebook 02 shows how volumes keep data.)\n"
           "3. Run `sleep 100` in a named VM and press *interrupt*: what does the status "
           "line say, and does the VM still answer?\n"
           "4. Compare `ps` inside the VM with `ps` on the host (`!ps aux | head`)."),
    ]


def memory_and_balloon():
    md, code = new_markdown_cell, new_code_cell
    return [
        md("# 01 · Memory and the balloon\n\n"
           "**What you will learn**\n"
           "- what a memory balloon is, and why a host wants one;\n"
           "- how to read `vm.balloon_stats()`: the balloon's size (*target* and *actual*, in "
           "4 KiB pages and in MiB) and the guest's own memory statistics;\n"
           "- inflate the balloon and watch the guest's free memory and the host's memory use "
           "go down, then deflate it and give the memory back.\n\n"
           "A VM gets its RAM when it boots, and the guest kernel treats all of it as its own. "
           "A **balloon** is a small driver inside the guest (virtio-balloon) that the host can "
           "ask to *inflate*: the driver allocates pages inside the guest, so no guest program "
           "can use them, and tells the host which pages they are. The host then drops the "
           "memory behind those pages. *Deflating* hands pages back to the guest. The balloon's "
           "size is the memory taken **away from** the guest."),
        md("## Start a VM with a balloon\n"
           "The device is opt-in: `balloon=True` in the config (`%%vm --balloon` in a cell). "
           "We give the guest 256 MiB and keep the VM in a variable, so several cells can "
           "work with it."),
        code("import time\n"
             "from supermachine_jupyter import Image, VmConfig\n\n"
             "config = VmConfig(memory_mib=256, balloon=True, engine=\"qemu\")\n"
             "vm = Image.default().start(config)\n"
             "print(vm)"),
        md("## Read the balloon\n"
           "`vm.balloon_stats()` returns one reading as a `BalloonStats` object. The field names "
           "and units are Firecracker's, whatever engine runs the VM."),
        code("stats = vm.balloon_stats()\n"
             "for field, value in stats.to_dict().items():\n"
             "    print(f\"{field:20} {value!r}\")"),
        md("What the fields mean:\n\n"
           "| field | meaning |\n|---|---|\n"
           "| `target_pages`, `target_mib` | the balloon size the host **asked for** (4 KiB "
           "pages, and MiB) |\n"
           "| `actual_pages`, `actual_mib` | the size the guest has **reached** so far: the "
           "driver hands pages over in batches, so it trails the target |\n"
           "| `free_memory` | bytes nothing in the guest uses |\n"
           "| `available_memory` | bytes a new program could get without swapping: free memory "
           "plus caches the kernel can drop (`MemAvailable`) |\n"
           "| `total_memory` | bytes the guest kernel manages: less than 256 MiB, because the "
           "kernel's own image and reserved areas are not counted |\n"
           "| `disk_caches` | bytes of page cache |\n"
           "| `swap_in`, `swap_out` | bytes swapped in and out (this guest has no swap: 0) |\n"
           "| `major_faults`, `minor_faults` | page faults since boot that needed I/O / did not |\n"
           "| `hugetlb_allocations`, `hugetlb_failures` | huge-page allocations; `None` here |\n\n"
           "`None` means **the guest did not report it** (this guest kernel has no huge-page "
           "support, so it never sends those two), which is not the same as 0. The guest sends "
           "its statistics about once a second, so a reading can be up to a second old."),
        md("## Two views of the same memory\n"
           "To see the balloon work we look from both sides: the guest's `/proc/meminfo`, and "
           "the resident memory (RSS) of the engine process on the host — the RAM this VM "
           "really costs the host."),
        code("MiB = 1024 * 1024\n\n\n"
             "def guest_meminfo():\n"
             "    \"\"\"MemTotal, MemFree and MemAvailable from the guest's /proc/meminfo, in MiB.\"\"\"\n"
             "    lines = vm.run(\"cat /proc/meminfo\").stdout.splitlines()\n"
             "    values = {line.split(':')[0]: int(line.split()[1]) // 1024 for line in lines}\n"
             "    return {key: values[key] for key in (\"MemTotal\", \"MemFree\", \"MemAvailable\")}\n\n\n"
             "def host_rss_mib():\n"
             "    \"\"\"Resident memory of the engine process(es) on the host, in MiB.\"\"\"\n"
             "    return vm.instance.host_rss_bytes() / MiB\n\n\n"
             "print(\"guest /proc/meminfo (MiB):\", guest_meminfo())\n"
             "rss_fresh = host_rss_mib()\n"
             "print(f\"host RSS of the engine:    {rss_fresh:.0f} MiB\")"),
        md("A freshly booted guest has touched little of its RAM, and the host only backs "
           "pages that were touched. A balloon can only give back memory the host really "
           "spent, so first let the guest use 100 MiB (a file in its tmpfs `/tmp`) and free it "
           "again. The guest sees the memory as free afterwards; the host still holds it."),
        code("print(vm.run(\"dd if=/dev/zero of=/tmp/fill bs=1M count=100 2>/dev/null; \"\n"
             "             \"rm /tmp/fill; free -m\").stdout)\n"
             "rss_touched = host_rss_mib()\n"
             "print(f\"host RSS: {rss_fresh:.0f} MiB fresh → {rss_touched:.0f} MiB after the \"\n"
             "      f\"guest used 100 MiB and freed it\")"),
        md("## Inflate by 64 MiB and watch\n"
           "`vm.request_balloon_inflate(64)` grows the balloon by 64 MiB and returns the new "
           "target. The target changes at once; `actual_pages` follows as the guest's driver "
           "hands pages over (64 MiB = 16384 pages of 4 KiB). The table is printed as the "
           "readings come in."),
        code("def watch(until, seconds=10.0, every=0.5):\n"
             "    \"\"\"Print a reading every `every` s until `until(stats)` holds (or `seconds` pass).\"\"\"\n"
             "    print(f\"{'t':>5}  {'target':>6}  {'actual':>6}  {'actual_pages':>12}  \"\n"
             "          f\"{'guest free':>10}  {'host RSS':>8}\")\n"
             "    started = time.monotonic()\n"
             "    while True:\n"
             "        s = vm.balloon_stats()\n"
             "        elapsed = time.monotonic() - started\n"
             "        print(f\"{elapsed:4.1f}s  {s.target_mib:4} M  {s.actual_mib:4} M  {s.actual_pages:12}  \"\n"
             "              f\"{s.free_memory / MiB:8.0f} M  {host_rss_mib():6.0f} M  \"\n"
             "              + \"█\" * (s.actual_mib // 4))\n"
             "        if until(s) or elapsed > seconds:\n"
             "            return s, elapsed\n"
             "        time.sleep(every)\n\n\n"
             "print(\"new target:\", vm.request_balloon_inflate(64), \"MiB\")\n"
             "stats, elapsed = watch(lambda s: s.actual_pages >= 16384)\n"
             "print(f\"balloon reached actual_pages={stats.actual_pages} \"\n"
             "      f\"({stats.actual_mib} MiB) after {elapsed:.1f} s\")"),
        md("`guest free` is the guest's own report, so it lags by up to a second. Wait for the "
           "next report, then compare both views with what they were before:"),
        code("time.sleep(1.5)\n"
             "print(\"guest free_memory:\", vm.balloon_stats().free_memory // MiB, \"MiB\")\n"
             "print(\"guest /proc/meminfo (MiB):\", guest_meminfo())\n"
             "rss_inflated = host_rss_mib()\n"
             "print(f\"host RSS: {rss_touched:.0f} MiB → {rss_inflated:.0f} MiB after inflating \"\n"
             "      f\"(host RSS fell by {rss_touched - rss_inflated:.0f} MiB)\")"),
        md("Three things to notice:\n\n"
           "- **MemFree and MemAvailable fell by about 64 MiB**: the balloon driver holds those "
           "pages, so no guest program can have them.\n"
           "- **MemTotal did not change.** This VM's balloon has *deflate-on-oom* on: the guest "
           "may take ballooned pages back rather than kill a program when it runs out of "
           "memory. In that mode Linux keeps the pages in MemTotal and counts them as used; "
           "without it, MemTotal would shrink instead.\n"
           "- **The host's RSS fell**: QEMU discarded the memory behind the ballooned pages "
           "(`madvise(MADV_DONTNEED)`), and the kernel took it back. This is the point of the "
           "balloon: the memory is free *on the host*, for other VMs."),
        md("## Deflate\n"
           "`vm.request_balloon_deflate(64)` shrinks the balloon again (`vm.set_balloon_target"
           "(mib)` sets an absolute size). The guest gets its pages back."),
        code("print(\"new target:\", vm.request_balloon_deflate(64), \"MiB\")\n"
             "stats, elapsed = watch(lambda s: s.actual_pages == 0)\n"
             "print(f\"balloon back to actual_pages={stats.actual_pages} after {elapsed:.1f} s\")\n"
             "print(\"guest /proc/meminfo (MiB):\", guest_meminfo())\n"
             "print(f\"host RSS: {host_rss_mib():.0f} MiB\")"),
        md("The guest's free memory is back, but the host's RSS does **not** climb back: the "
           "returned pages cost the host nothing until the guest writes to them again, when "
           "they are faulted in one by one."),
        md("## The same, live: `BalloonPanel`\n"
           "The widget samples `vm.balloon_stats()` once a second on a background thread and "
           "charts the balloon (actual solid, target dashed) with the guest's free and "
           "available memory; its buttons inflate and deflate by 16 or 64 MiB. Because it "
           "samples on its own thread, the kernel stays free: the next cell runs while the "
           "chart moves."),
        code("from supermachine_jupyter.widgets import BalloonPanel\n\n"
             "panel = BalloonPanel(vm)\n"
             "panel"),
        code("panel.inflate(64)          # what the \"+64 MiB\" button does\n"
             "time.sleep(4)\n"
             "panel.deflate(64)\n"
             "time.sleep(4)\n"
             "for sample in panel.history[-8:]:\n"
             "    print(time.strftime(\"%H:%M:%S\", time.localtime(sample[\"time\"])),\n"
             "          f\"actual {sample['actual_mib']:3} MiB  target {sample['target_mib']:3} MiB  \"\n"
             "          f\"free {sample['free_mib']:4.0f} MiB\")\n"
             "print(\"samples so far:\", len(panel.history))"),
        md("Stopping the VM ends the panel's thread too; the chart keeps its last picture."),
        code("vm.stop()\nprint(vm.state)"),
        md("## Exercises\n"
           "1. Inflate the balloon until the guest has about 30 MiB free, then write 100 MiB "
           "into `/tmp` in the guest. What happens to `actual_pages`, and why? (Hint: "
           "deflate-on-oom.)\n"
           "2. Watch `minor_faults` while the guest runs a command that allocates memory "
           "(`dd if=/dev/zero of=/tmp/x bs=1M count=20`). How many faults per MiB do you see, "
           "and what page size does that suggest?\n"
           "3. Start a VM **without** `balloon=True` and call `vm.balloon_stats()`. Read the "
           "error message: what does it tell you to do?\n"
           "4. The guest reports `total_memory` below 256 MiB. Run `dmesg | grep Memory:` in "
           "the guest: where did the rest go?"),
    ]


def volumes():
    md, code = new_markdown_cell, new_code_cell
    return [
        md("# 02 · Volumes: data that outlives the VM\n\n"
           "**What you will learn**\n"
           "- why a VM's files vanish when it stops, and how a **volume** keeps them;\n"
           "- what a volume is on the host: a sparse file holding an ext4 filesystem;\n"
           "- attach several volumes, and a read-only one that refuses writes;\n"
           "- the same from a cell with `%%vm --volume HOST:GUEST:SIZE`.\n\n"
           "The guest's root filesystem lives in RAM (an initramfs), so everything written "
           "there is gone when the VM stops. A volume is a virtual disk (virtio-blk) backed by "
           "a file on the host: the guest mounts it, writes to it, and the next VM that "
           "attaches the same file finds the data again."),
        md("## A volume is a host file\n"
           "`VmConfig().with_volume(host_path, guest_path, size_mib=…)` returns a new config "
           "with one more volume. The host file need not exist: it is created on first use. "
           "We keep the files in a fresh temporary directory."),
        code("import os\n"
             "import tempfile\n"
             "from supermachine_jupyter import Image, VmConfig\n\n"
             "workdir = tempfile.mkdtemp(prefix=\"nb02-\")\n"
             "data_img = os.path.join(workdir, \"data.img\")\n"
             "config = VmConfig(engine=\"qemu\").with_volume(data_img, \"/data\", size_mib=64)\n"
             "print(config)\n"
             "print(\"exists before the first VM:\", os.path.exists(data_img))"),
        md("## First VM: write some data\n"
           "The first VM that uses the volume formats it: the host creates a 64 MiB **sparse** "
           "file and runs `mkfs.ext4` on it (the guest has no `mkfs`, and formatting on the "
           "host means no guest ever sees half a filesystem). The guest's init mounts it at "
           "`/data`. `sync` flushes the guest's caches to the disk before the VM stops."),
        code("image = Image.default()\n"
             "with image.start(config) as vm:\n"
             "    print(vm.run(\"mount | grep /data; df -m /data\").stdout)\n"
             "    vm.run(\"echo 'written by the first VM' > /data/notes.txt; \"\n"
             "           \"echo 'tmp file' > /tmp/lost.txt; sync\")\n"
             "print(\"VM stopped:\", vm.state)"),
        md("## What the file costs on the host\n"
           "The file's size is 64 MiB, but the host has only stored the blocks the filesystem "
           "wrote (its metadata, journal and our file): `st_blocks` counts 512-byte blocks "
           "actually allocated. That is what *sparse* means."),
        code("def disk_usage(path):\n"
             "    st = os.stat(path)\n"
             "    return (f\"{os.path.basename(path)}: size {st.st_size / 2**20:.0f} MiB, \"\n"
             "            f\"allocated on the host {st.st_blocks * 512 / 2**20:.1f} MiB \"\n"
             "            f\"(st_blocks={st.st_blocks})\")\n\n\n"
             "print(disk_usage(data_img))"),
        md("## Second VM: the data is still there\n"
           "A brand-new VM (a new kernel boot, a fresh RAM root filesystem) attaches the same "
           "file. This time we also add a **second volume**, `/scratch`: volumes attach in "
           "order, and each carries a serial number the guest's init uses to mount it at the "
           "right path. `vm.volumes()` shows them from the host side."),
        code("scratch_img = os.path.join(workdir, \"scratch.img\")\n"
             "two = config.with_volume(scratch_img, \"/scratch\", size_mib=32)\n"
             "with image.start(two) as vm:\n"
             "    result = vm.run(\"cat /data/notes.txt; cat /tmp/lost.txt\")\n"
             "    print(\"data read back after restart:\", result.stdout.strip())\n"
             "    print(\"RAM file after restart:\", result.stderr.strip())\n"
             "    print(vm.run(\"mount | grep -E '/data|/scratch'\").stdout)\n"
             "    vm.run(\"dd if=/dev/urandom of=/scratch/blob bs=1M count=8 2>/dev/null; sync\")\n"
             "    for volume in vm.volumes():\n"
             "        print(volume)"),
        md("`/tmp/lost.txt` lived in the guest's RAM and is gone; `/data/notes.txt` survived. "
           "The 8 MiB we wrote to `/scratch` shows up in the host file's allocation:"),
        code("print(disk_usage(data_img))\nprint(disk_usage(scratch_img))"),
        md("## A read-only volume\n"
           "`read_only=True` attaches the disk read-only **at the device**: the virtual disk "
           "itself refuses writes, so it does not matter what the guest tries. Reference data "
           "you want to share with many VMs, unchanged, belongs on a read-only volume."),
        code("read_only = VmConfig(engine=\"qemu\").with_volume(data_img, \"/data\", size_mib=64,\n"
             "                                                 read_only=True)\n"
             "with image.start(read_only) as vm:\n"
             "    print(vm.run(\"cat /data/notes.txt\").stdout.strip())\n"
             "    attempt = vm.run(\"echo overwrite > /data/notes.txt\")\n"
             "    print(\"write:\", attempt.exit_code, attempt.stderr.strip())\n"
             "    attempt = vm.run(\"mount -o remount,rw /data\")\n"
             "    print(\"remount rw:\", attempt.exit_code, attempt.stderr.strip())"),
        md("The write fails with *Read-only file system*, and even remounting read-write "
           "inside the guest fails: the kernel sees a write-protected disk."),
        md("## The same from a cell\n"
           "`%%vm --volume HOST:GUEST[:SIZE_MIB][:ro]` adds a volume (repeat the option for "
           "more). IPython expands `{workdir}` in the magic's line from the notebook's "
           "variables."),
        code("%load_ext supermachine_jupyter"),
        code("%%vm --engine qemu --volume {workdir}/data.img:/data:64\n"
             "cat /data/notes.txt\n"
             "echo \"appended from a cell\" >> /data/notes.txt\n"
             "ls -l /data"),
        md("Clean up the volume files (a real project would keep them: that is the point)."),
        code("import shutil\nshutil.rmtree(workdir)\nprint(\"removed\", workdir)"),
        md("## Exercises\n"
           "1. Run the `%%vm --volume` cell twice. What does `/data/notes.txt` hold now, and "
           "why?\n"
           "2. Write 20 MiB to a volume, then delete the file in the guest. Does the host "
           "file's allocation shrink? (Look up `fstrim` and the disk's `discard` option.)\n"
           "3. What happens if you give a volume file that holds something other than ext4, "
           "say a text file? Read the error.\n"
           "4. Attach the same volume to two VMs that run at the same time, one of them "
           "writable. Why is this dangerous for ext4, and why is read-only on both safe?"),
    ]


def host_mounts():
    md, code = new_markdown_cell, new_code_cell
    return [
        md("# 03 · Host directories in the guest (virtio-fs)\n\n"
           "**What you will learn**\n"
           "- share a host directory with a VM: `VmConfig().with_virtiofs(host_dir, tag, "
           "guest_path)`;\n"
           "- the guest reads host files, and what it writes appears on the host at once;\n"
           "- **isolation**: what the guest can and cannot see — `..`, absolute paths and "
           "symlinks pointing outside the directory;\n"
           "- why the host should still treat files the guest wrote as untrusted;\n"
           "- read-only mounts, and the per-mount counters of `vm.mounts()`.\n\n"
           "A volume (notebook 02) is a whole disk that only the guest understands. A "
           "**mount** shares a live directory, file by file: the guest's kernel asks a file "
           "server on the host (`virtiofsd`) for each lookup, read and write, over virtio-fs. "
           "Host and guest see each other's changes."),
        md("## A directory to share\n"
           "We build a small tree in a temporary directory. Only `share/` and `reference/` "
           "will be given to the guest; `secret.txt` sits **next to** them, outside, and two "
           "symlinks inside `share/` point at it."),
        code("import os\n"
             "import tempfile\n"
             "from pathlib import Path\n"
             "from supermachine_jupyter import Image, VmConfig\n\n"
             "lab = Path(tempfile.mkdtemp(prefix=\"nb03-\"))\n"
             "share, reference = lab / \"share\", lab / \"reference\"\n"
             "share.mkdir()\n"
             "reference.mkdir()\n"
             "(lab / \"secret.txt\").write_text(\"host secret: the guest must not read this\\n\")\n"
             "(share / \"note.txt\").write_text(\"hello from the host\\n\")\n"
             "(share / \"abs-link\").symlink_to(lab / \"secret.txt\")     # absolute, points outside\n"
             "(share / \"rel-link\").symlink_to(\"../secret.txt\")         # relative, points outside\n"
             "(reference / \"data.csv\").write_text(\"x,y\\n1,2\\n\")\n\n"
             "for path in sorted(lab.rglob(\"*\")):\n"
             "    target = f\" -> {os.readlink(path)}\" if path.is_symlink() else \"\"\n"
             "    print(path.relative_to(lab.parent), target, sep=\"\")"),
        md("## Start a VM with two mounts\n"
           "Each mount has a **tag** (the name the guest mounts it by) and a guest path. The "
           "second one is read-only. Under QEMU each mount gets its own `virtiofsd` process."),
        code("config = (VmConfig(engine=\"qemu\")\n"
             "          .with_virtiofs(share, \"share\", \"/mnt/share\")\n"
             "          .with_virtiofs(reference, \"reference\", \"/mnt/reference\", read_only=True))\n"
             "vm = Image.default().start(config)\n"
             "print(vm)\n"
             "print(vm.run(\"mount | grep virtiofs\").stdout)"),
        md("## Reading and writing across the boundary"),
        code("print(\"guest reads:\", vm.run(\"cat /mnt/share/note.txt\").stdout.strip())\n\n"
             "vm.run(\"echo 'hello from the guest' > /mnt/share/from-guest.txt\")\n"
             "print(\"host reads: \", (share / \"from-guest.txt\").read_text().strip())"),
        md("## What the guest cannot see\n"
           "Now the guest tries four ways out of `/mnt/share` to `secret.txt`. Each attempt "
           "prints `blocked` or `LEAK`."),
        code("attempts = f\"\"\"\n"
             "try() {{ label=$1; shift\n"
             "  if out=$(\"$@\" 2>&1); then echo \"LEAK    $label: $out\"; else echo \"blocked $label: $out\"; fi; }}\n"
             "try '..              ' cat /mnt/share/../secret.txt\n"
             "try 'host path       ' cat {lab}/secret.txt\n"
             "try 'absolute symlink' cat /mnt/share/abs-link\n"
             "try 'relative symlink' cat /mnt/share/rel-link\n"
             "echo \"abs-link, as the guest reads it: $(readlink /mnt/share/abs-link)\"\n"
             "\"\"\"\n"
             "print(vm.run(attempts).stdout)"),
        md("Why each one fails:\n\n"
           "- **Paths are resolved by the guest's kernel, in the guest's tree.** `/mnt/share/..`"
           " is the guest's `/mnt`; the host path does not exist in the guest at all (its `/` "
           "is its own RAM filesystem).\n"
           "- **Symlinks too.** `abs-link` says `/tmp/nb03-…/secret.txt`, and the guest looks "
           "that up in *its own* `/tmp`; `rel-link` leads to the guest's `/mnt/secret.txt`. "
           "The guest can read the symlink's *text* — so it learns a host path — but cannot "
           "follow it out.\n"
           "- **And on the host, the file server is locked in.** `virtiofsd` moves itself into "
           "a private mount namespace whose root *is* the shared directory (`pivot_root`), so "
           "even a hostile guest kernel that sent raw \"look up `..`\" requests would find "
           "nothing above `share/`.\n\n"
           "What the guest **can** see is everything beneath the directory, hidden files "
           "included, with the host's owners and permissions. Share a directory made for the "
           "purpose, never your home directory."),
        md("## The other direction: guest-made symlinks\n"
           "The guest cannot follow a link out, but it can **create** one, and the host *will* "
           "follow it. A host program that opens files in the share without care can be "
           "tricked into reading (or overwriting) its own files:"),
        code("vm.run(\"ln -s /etc/hostname /mnt/share/innocent.txt\")\n"
             "link = share / \"innocent.txt\"\n"
             "print(f\"guest created {link.name} -> {os.readlink(link)}\")\n"
             "print(f\"on the host it resolves to {link.resolve()}: the HOST's file\")\n"
             "print(f\"inside the share? {link.resolve().is_relative_to(share)}\")"),
        md("So treat everything a guest wrote as untrusted input: check `resolve()` stays "
           "beneath the share, or open with `O_NOFOLLOW`."),
        md("## A read-only mount\n"
           "The guest reads `reference/` but cannot change it. This is enforced **on the "
           "host**: the `virtiofsd` of a read-only mount runs where the directory is "
           "bind-mounted read-only. To prove it, the guest remounts its side read-write (which "
           "it is allowed to do) and tries again:"),
        code("print(vm.run(\"cat /mnt/reference/data.csv\").stdout)\n"
             "for script in (\"echo 3,4 >> /mnt/reference/data.csv\",\n"
             "               \"mount -o remount,rw /mnt/reference && mount | grep /mnt/reference \"\n"
             "               \"&& echo 3,4 >> /mnt/reference/data.csv\"):\n"
             "    attempt = vm.run(script)\n"
             "    print(f\"$ {script}\\n{attempt.stdout}exit {attempt.exit_code}: {attempt.stderr.strip()}\\n\")\n"
             "print(\"host file unchanged:\", (reference / \"data.csv\").read_text() == \"x,y\\n1,2\\n\")"),
        md("## Counters\n"
           "`vm.mounts()` lists each mount with counters measured on the host from the file "
           "server's I/O accounting: operations (system calls) and bytes read and written on "
           "the guest's behalf. Read a 2 MiB host file in the guest and watch `bytes_read` "
           "move. (`dax` says whether file pages are mapped straight into the guest; QEMU 7.2 "
           "cannot, and the note says so.)"),
        code("def show_mounts():\n"
             "    print(f\"{'tag':10} {'guest path':15} {'ro':5} {'ops':>6} {'read':>10} {'written':>8}  dax\")\n"
             "    for m in vm.mounts():\n"
             "        c = m.counters\n"
             "        print(f\"{m.spec.tag:10} {m.spec.guest_path:15} {str(m.spec.read_only):5} \"\n"
             "              f\"{c.ops:6} {c.bytes_read:10} {c.bytes_written:8}  {m.dax} ({m.dax_note})\")\n\n\n"
             "show_mounts()"),
        md("The counters are not zero even for `reference`, which the guest has barely "
           "touched: the file server also counts its own start-up and the guest's mount-time "
           "lookups. Look at how they **change**:"),
        code("import hashlib\n\n"
             "(share / \"big.bin\").write_bytes(os.urandom(2 * 1024 * 1024))\n"
             "before = vm.mounts()[0].counters.bytes_read\n"
             "print(\"guest:\", vm.run(\"md5sum /mnt/share/big.bin\").stdout.strip())\n"
             "print(\"host: \", hashlib.md5((share / \"big.bin\").read_bytes()).hexdigest())\n"
             "after = vm.mounts()[0].counters.bytes_read\n"
             "print(f\"share's bytes_read grew by {(after - before) / 2**20:.2f} MiB\\n\")\n"
             "show_mounts()"),
        code("vm.stop()"),
        md("## The same from a cell\n"
           "`%%vm --mount HOST:TAG:GUEST[:ro]` (repeatable):"),
        code("%load_ext supermachine_jupyter"),
        code("%%vm --engine qemu --mount {share}:share:/mnt/share --mount {reference}:ref:/mnt/ref:ro\n"
             "cat /mnt/share/from-guest.txt\n"
             "ls /mnt/ref"),
        code("import shutil\nshutil.rmtree(lab)"),
        md("## Exercises\n"
           "1. While a VM runs, change `note.txt` on the host. How soon does the guest see "
           "the new text?\n"
           "2. On the host, make a **hard** link inside `share/` to `secret.txt`. Can the guest "
           "read it? Why is a hard link different from a symlink here?\n"
           "3. Write a host function `safe_read(share, name)` that refuses anything resolving "
           "outside `share` and test it against `innocent.txt`.\n"
           "4. A dataset the guest only reads, a database the guest writes: which would you "
           "give it as a mount, which as a volume, and why?"),
    ]


def widgets_dashboard():
    md, code = new_markdown_cell, new_code_cell
    return [
        md("# 04 · Widgets: build a config, start a VM, watch it\n\n"
           "**What you will learn**\n"
           "- edit a `VmConfig` with a form (`VmConfigForm`) that is **two-way linked** to it: "
           "the widgets change the config, and the config changes the widgets;\n"
           "- what the form does with an invalid entry;\n"
           "- start, watch and stop a VM from a `VmDashboard`: its console, balloon and "
           "mounts, live, while the notebook stays usable;\n"
           "- the shortcut: `%%vm --panel` and `%vm panel NAME`.\n\n"
           "The widgets are ipywidgets, so they need a live kernel to move: in a saved "
           "notebook you see their last state. Every cell below also does in code what you "
           "would do with the mouse, so it runs the same headless."),
        md("## A form on a config\n"
           "`VmConfigForm(config)` edits **that very object**: there is one config, and the "
           "form is a view of it."),
        code("import tempfile\n"
             "import time\n"
             "from pathlib import Path\n"
             "from supermachine_jupyter import MountSpec, VmConfig, VolumeSpec\n"
             "from supermachine_jupyter.widgets import VmConfigForm, VmDashboard\n\n"
             "config = VmConfig(memory_mib=256, engine=\"qemu\")\n"
             "form = VmConfigForm(config)\n"
             "print(\"form edits this config object:\", form.config is config)\n"
             "form"),
        md("Moving a widget assigns the config's field (here we set the widgets from code, "
           "as a click would):"),
        code("form.memory.value = 384        # drag the memory slider\n"
             "form.balloon.value = True      # tick \"virtio-balloon\"\n"
             "form.name.value = \"dash-demo\"  # type a name\n"
             "print(config)"),
        md("…and changing the config moves the widgets, whoever changes it:"),
        code("config.memory_mib = 320\n"
             "config.balloon = False\n"
             "print(\"slider:\", form.memory.value, \"· balloon box:\", form.balloon.value)\n"
             "config.balloon = True"),
        md("## Invalid entries\n"
           "The config validates every value. When it refuses one, the form shows the "
           "config's own message in red under the field, the widget keeps what you typed, "
           "and **the config keeps its last valid value**:"),
        code("form.name.value = \"no spaces allowed\"\n"
             "print(\"form.errors:\", form.errors)\n"
             "print(\"config.name is still:\", config.name)\n"
             "form.name.value = \"dash-demo\"\n"
             "print(\"after fixing it, errors:\", form.errors)"),
        md("## Volumes and mounts\n"
           "The lists are rows of fields; a complete row becomes a `VolumeSpec` or "
           "`MountSpec` in the config at once. A row that the spec refuses is marked and "
           "left out:"),
        code("workdir = Path(tempfile.mkdtemp(prefix=\"nb04-\"))\n"
             "(workdir / \"share\").mkdir()\n"
             "(workdir / \"share\" / \"hello.txt\").write_text(\"hello through the mount panel\\n\")\n\n"
             "form.add_row(\"volumes\", VolumeSpec(str(workdir / \"data.img\"), \"/data\", size_mib=64))\n"
             "row = form.add_row(\"mounts\", MountSpec(str(workdir / \"share\"), \"share\", \"/mnt/share\"))\n"
             "print(\"volumes:\", [v.guest_path for v in config.volumes], \"· mounts:\",\n"
             "      [m.guest_path for m in config.mounts])\n\n"
             "row.guest_path.value = \"relative/path\"          # a guest path must be absolute\n"
             "print(\"error:\", form.errors.get(\"mounts\"))\n"
             "print(\"mounts in the config meanwhile:\", [m.guest_path for m in config.mounts])\n"
             "row.guest_path.value = \"/mnt/share\"\n"
             "print(\"fixed:\", form.errors, [m.guest_path for m in config.mounts])"),
        md("## The dashboard\n"
           "`VmDashboard(config=config)` holds a form like the one above (on a copy of the "
           "config, for the next start), **start**/**stop** buttons, a state line saying which "
           "engine runs the VM and why, and tabs with the live console, balloon and mounts. "
           "**start** boots the VM on a background thread, so the notebook stays free while "
           "it boots; `dashboard.wait()` lets code wait for it."),
        code("dashboard = VmDashboard(config=config)\n"
             "dashboard"),
        code("dashboard.start()          # the \"start\" button\n"
             "dashboard.wait(120)\n"
             "vm = dashboard.vm\n"
             "print(vm)"),
        md("The VM is an ordinary `Vm`: use it from code while the panels watch it. The "
           "console tab follows the guest's serial console, the balloon tab charts memory, "
           "the mounts tab counts the virtio-fs traffic:"),
        code("print(vm.run(\"cat /mnt/share/hello.txt; echo hi > /data/x; \"\n"
             "             \"dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>/dev/null; rm /tmp/fill\").stdout)\n"
             "dashboard.balloon.inflate(64)       # the \"+64 MiB\" button of the balloon tab\n"
             "deadline = time.monotonic() + 20     # the tab samples once a second\n"
             "while dashboard.balloon.history[-1][\"actual_mib\"] < 64 and time.monotonic() < deadline:\n"
             "    time.sleep(0.5)\n\n"
             "last = dashboard.balloon.history[-1]\n"
             "print(f\"balloon tab: actual {last['actual_mib']} MiB of target {last['target_mib']} MiB, \"\n"
             "      f\"guest free {last['free_mib']:.0f} MiB\")\n"
             "for r in dashboard.mounts.refresh():\n"
             "    print(f\"mounts tab: {r['kind']:6} {r['guest_path']:11} {r['tag']:7} ops={r['ops']} \"\n"
             "          f\"read={r['bytes_read']} used_on_host={r['used_bytes']}\")\n"
             "print(\"console tab, last line:\", dashboard.console.text.strip().splitlines()[-1][:100])\n"
             "print(\"panel threads alive:\", len(dashboard.threads()))"),
        code("dashboard.stop()           # the \"stop\" button\n"
             "dashboard.wait(30)\n"
             "time.sleep(1)\n"
             "print(\"VM:\", vm.state, \"· panel threads alive:\", len(dashboard.threads()))\n"
             "dashboard.close()"),
        md("## The shortcut in a cell\n"
           "`%%vm --panel` shows the same dashboard under a cell's output, for the VM that "
           "runs the cell; `%vm panel NAME` shows it for a named VM at any time."),
        code("%load_ext supermachine_jupyter"),
        code("%%vm --name panel-demo --balloon --engine qemu --panel\n"
             "echo \"this cell's VM has a dashboard above\"\n"
             "free -m | head -2"),
        code("%vm panel panel-demo"),
        code("%vm stop panel-demo"),
        code("import shutil\nshutil.rmtree(workdir)"),
        md("## Exercises\n"
           "1. Drag the memory slider of the form while a dashboard's VM runs. Does the "
           "running VM change? When does the new value take effect?\n"
           "2. Type a tag with a space into a mount row. Read the message: which rule of "
           "`MountSpec` does it come from?\n"
           "3. Press **+64 MiB** on the balloon tab until the guest has almost no free memory, "
           "then run a command that needs memory. What does the chart show?\n"
           "4. Start a VM with a volume from the dashboard, write to it, stop it, start again "
           "from the same form: is the data there (notebook 02)?"),
    ]


def engines():
    md, code = new_markdown_cell, new_code_cell
    return [
        md("# 05 · Engines: native core vs QEMU, measured here\n\n"
           "**What you will learn**\n"
           "- what `python -m supermachine_jupyter doctor` says about a machine;\n"
           "- how `engine=\"auto\"` picks between the project's native KVM core and QEMU, and "
           "why it measures instead of trusting CPU flags;\n"
           "- timings measured on *this* machine: QEMU boot times, the native core's "
           "calibration and its time to a guest's first output;\n"
           "- why a Linux guest cannot boot on this machine's `/dev/kvm`.\n\n"
           "Two engines run the same guest image behind the same `Vm` API:\n\n"
           "| engine | what it is |\n|---|---|\n"
           "| `native` | the project's own KVM core in C (bound with cffi): a KVM VM inside the "
           "Python process, vCPU threads, virtio-mmio devices |\n"
           "| `qemu` | a `qemu-system-x86_64 -M microvm` process: KVM where KVM runs guests at "
           "hardware speed, else **TCG**, QEMU's software emulator |\n\n"
           "*The outputs stored in this notebook come from the workplace machine it was "
           "written on; run it to see your own.*"),
        md("## Ask the doctor\n"
           "The doctor checks `/dev/kvm`, QEMU, the guest assets and the native core (it "
           "runs the core's probe guests), and says which engine `auto` picks and why. It "
           "takes a few seconds because it really runs things."),
        code("import sys\n"
             "!{sys.executable} -m supermachine_jupyter doctor"),
        md("## How `auto` chooses\n"
           "`choose_engine()` is what `Image.start` calls. It rests on `kvm_status()`, a "
           "verdict about this host's KVM, with the reason and the hints behind it:"),
        code("from supermachine_jupyter.engines.accel import kvm_status\n"
             "from supermachine_jupyter.engines import choose_engine, native_available\n\n"
             "status = kvm_status()\n"
             "print(\"KVM speed:\", status.speed)\n"
             "print(\"reason:   \", status.reason)\n"
             "for hint in status.hints:\n"
             "    print(\"hint:     \", hint)\n"
             "native_ok, native_why = native_available()\n"
             "print(\"native:   \", native_why)\n"
             "print()\n"
             "for requested in (\"auto\", \"qemu\", \"native\"):\n"
             "    try:\n"
             "        choice = choose_engine(requested)\n"
             "        print(f\"{requested:6} → {choice.name}/{choice.accel}: {choice.reason}\")\n"
             "    except Exception as error:   # e.g. engine='native' where the core cannot run\n"
             "        print(f\"{requested:6} → error: {error}\")"),
        md("The rule: **`auto` picks `native` only where KVM runs guests at hardware speed**, "
           "and QEMU otherwise — with KVM when KVM is fast, with TCG when it is emulated or "
           "absent. (`native` can still be requested explicitly, with a warning.)\n\n"
           "The hints show why flags are not enough: on the machine these outputs come from, "
           "`/dev/kvm` exists and opens fine, yet the CPU has no `vmx`/`svm` flag and a "
           "`kvm_pvm` module is loaded. A `/dev/kvm` can be *emulated*. So the verdict comes "
           "from a measurement, cached until the next host reboot: the native core's `calib` "
           "probe guest runs a fixed integer loop under KVM, the host runs the same loop, and "
           "both are timed with the CPU's timestamp counter. Here it is, run fresh:"),
        code("from supermachine_jupyter.engines import native\n\n"
             "if not native_ok:\n"
             "    print(f\"the native core cannot run here: {native_why}\")\n"
             "else:\n"
             "    cal = native.calibrate()\n"
             "    print(f\"same loop, {cal['iterations']:,} iterations: host {cal['host_cycles']:,} \"\n"
             "          f\"cycles, KVM guest {cal['guest_cycles']:,} cycles\")\n"
             "    print(f\"ratio {cal['ratio']:,.0f}x → {cal['speed']} \"\n"
             "          f\"(hardware speed means under {native.CALIB_HARDWARE_MAX_RATIO:g}x); \"\n"
             "          f\"wall time {cal['wall_seconds']:.2f} s\")"),
        md("And how long the native core takes from creating a VM to the first byte a tiny "
           "probe guest writes to its serial port (median of five):"),
        code("import statistics\n\n"
             "if native_ok:\n"
             "    samples = [native.first_uart_byte_seconds() for _ in range(5)]\n"
             "    print(\"first UART byte:\", \", \".join(f\"{s * 1000:.1f} ms\" for s in samples))\n"
             "    print(f\"median {statistics.median(samples) * 1000:.1f} ms\")"),
        md("On an emulated KVM the two numbers together tell the story: **creating a KVM VM "
           "and entering it is fast** (milliseconds), but **running guest instructions is "
           "thousands of times slower** than on the host. A tiny probe that prints a line "
           "does not notice; a Linux kernel does."),
        md("## Boot times with `auto`\n"
           "Three VMs, one after another: boot time (engine start until the guest agent "
           "answers), the guest's own uptime at that point, one agent round trip, and the "
           "time to stop."),
        code("import time\n"
             "from supermachine_jupyter import Image, VmConfig\n\n"
             "image = Image.default()\n"
             "print(f\"{'run':>3}  {'engine':10} {'boot':>7} {'guest uptime':>12} {'ping':>8} {'stop':>7}\")\n"
             "boots = []\n"
             "for run in range(1, 4):\n"
             "    vm = image.start(VmConfig(engine=\"auto\"))\n"
             "    uptime = float(vm.run(\"cut -d' ' -f1 /proc/uptime\").stdout)\n"
             "    ping = vm.ping()\n"
             "    stop_started = time.monotonic()\n"
             "    vm.stop()\n"
             "    stop = time.monotonic() - stop_started\n"
             "    boots.append(vm.boot_seconds)\n"
             "    print(f\"{run:3}  {vm.engine + '/' + vm.accel:10} {vm.boot_seconds:6.2f}s \"\n"
             "          f\"{uptime:11.2f}s {ping * 1000:6.1f}ms {stop:6.2f}s\")\n"
             "print(f\"median boot: {statistics.median(boots):.2f} s\")"),
        md("Under TCG, QEMU translates the guest's machine code into host code block by "
           "block and caches the translations: a small guest reaches its agent in a second or "
           "two. On a machine whose KVM runs at hardware speed, `auto` picks `native` and "
           "this table shows it instead — run the notebook there to compare."),
        md("## Why Linux cannot boot on this `/dev/kvm`\n"
           "Let us try anyway: boot the real guest kernel on the native core, straight into "
           "KVM (entered through PVH, no bootloader), and see where it stops. This takes "
           "several seconds, because every instruction is slow. (Where KVM is not emulated "
           "the experiment does not apply, and the cell says so.)"),
        code("import textwrap\n"
             "from supermachine_jupyter.engines.native import NativeVm\n\n"
             "on_emulated_kvm = native_ok and status.speed == \"emulated\"\n"
             "if not on_emulated_kvm:\n"
             "    print(f\"KVM is {status.speed} here and the native core is \"\n"
             "          f\"{'available' if native_ok else 'unavailable'}: nothing to show\")\n"
             "else:\n"
             "    linux = NativeVm(image.vmlinux, memory_mib=128,\n"
             "                     cmdline=\"console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1\")\n"
             "    started = time.monotonic()\n"
             "    linux.start()\n"
             "    state = linux.wait(180)\n"
             "    elapsed = time.monotonic() - started\n"
             "    console = linux.console_output().decode(errors=\"replace\")\n"
             "    info = linux.exit_info()\n"
             "    linux.close()\n\n"
             "    kernel_lines = [line for line in console.splitlines() if line.startswith(\"[ \")]\n"
             "    print(\"\\n\".join(line[:110] for line in kernel_lines[:2]))\n"
             "    print(\"   ⋮\")\n"
             "    print(\"\\n\".join(line[:110] for line in kernel_lines[-4:]))\n"
             "    print(f\"\\nVM {state} after {elapsed:.1f} s: {info['reason']}\")\n"
             "    print(textwrap.fill(info[\"message\"], 100))"),
        md("The kernel got far — its banner, our command line, the memory map, CPU feature "
           "detection — and then the VM failed. The core's exit record says where: the "
           "instruction pointer and the bytes of the instruction KVM could not handle. "
           "Decoding them:"),
        code("# 0F AE is an opcode *group*: the ModRM byte's reg field (bits 5..3) picks the instruction.\n"
             "GROUP_0FAE = [\"fxsave\", \"fxrstor\", \"ldmxcsr\", \"stmxcsr\", \"xsave\", \"xrstor\",\n"
             "              \"xsaveopt\", \"clflush\"]\n\n\n"
             "def decode(insn: bytes) -> str:\n"
             "    rex = insn[0] if insn[0] & 0xF0 == 0x40 else 0        # REX prefix, if any\n"
             "    opcode, modrm = (insn[1:3], insn[3]) if rex else (insn[0:2], insn[2])\n"
             "    if opcode == b\"\\x0f\\xae\" and modrm >> 6 != 3:        # a memory operand\n"
             "        return GROUP_0FAE[(modrm >> 3) & 7] + (\"64\" if rex & 0x08 else \"\")\n"
             "    return \"not in the 0F AE group: look it up in the Intel SDM\"\n\n\n"
             "if on_emulated_kvm:\n"
             "    print(f\"RIP {info['rip']:#x}, instruction bytes {info['insn_bytes'].hex(' ')}\")\n"
             "    print(f\"→ {decode(info['insn_bytes'])}\")"),
        md("`xrstor64`: the kernel restoring the CPU's extended (FPU/SSE/AVX) register state. "
           "What happened:\n\n"
           "- This machine is itself a virtual machine without hardware virtualization "
           "passed through (no `vmx`/`svm` flag). Its `/dev/kvm` comes from `kvm_pvm`, a KVM "
           "that works **without** VT-x/AMD-V by running the guest deprivileged and handling "
           "in software what cannot run directly. Whatever the mechanism, the calibration "
           "measured the result: even plain integer code ran thousands of times slower in "
           "the guest than on the host.\n"
           "- Early in boot, Linux sets up the FPU with **XRSTOR**. On this KVM the "
           "instruction ends up in KVM's instruction emulator, which does not implement it, "
           "so KVM reports `KVM_EXIT_INTERNAL_ERROR` with *emulation failure*. (Booted with "
           "`noxsave`, the kernel gets a little further and fails the same way on the "
           "`int3` of its alternatives self-test.)\n"
           "- The native core turns that exit into a failed VM with a clear message — RIP and "
           "instruction bytes — instead of hanging; QEMU with `-accel kvm` leaves the VM "
           "paused silently at the same point.\n\n"
           "So on this machine `auto` runs QEMU with TCG: slower per instruction than real "
           "KVM, but it runs a complete Linux in a second or two. The native core is still "
           "tested here, with small freestanding probe guests that drive each device the way "
           "Linux's drivers do."),
        md("## Exercises\n"
           "1. Run `!{sys.executable} -m supermachine_jupyter doctor --json` and find the "
           "calibration ratio and the result of each native probe.\n"
           "2. Start a VM with `VmConfig(engine=\"native\")` and `boot_timeout=60`. Read the "
           "error: which lines of the console does it show you?\n"
           "3. Boot the kernel on the native core again with `noxsave` added to the command "
           "line. Decode the instruction it stops on now (`cc` is `int3`).\n"
           "4. Extend the boot table with `VmConfig(engine=\"qemu\", memory_mib=512, vcpus=2)`."
           " Which costs more boot time under TCG: memory or vCPUs?"),
    ]


def snapshots():
    md, code = new_markdown_cell, new_code_cell
    return [
        md("# 06 · Snapshots: save a running VM, start many from it\n\n"
           "**What you will learn**\n"
           "- save a running VM — its memory, processes and devices — with "
           "`vm.snapshot(path)`;\n"
           "- start new VMs from it with `Image.from_snapshot(path).start(config)`: each "
           "carries on where the snapshot left off, on its own;\n"
           "- how much faster a restore is than a cold boot, measured here;\n"
           "- `restore_timeout`, and how a damaged snapshot is refused;\n"
           "- the same in cells: `%%vm --snapshot NAME`, `%%vm --from NAME`, "
           "`%vm snapshots`;\n"
           "- why restored VMs share their memory (copy-on-write, PSS), and the pre-booted "
           "snapshot behind every `%%vm` cell.\n\n"
           "A snapshot is not a disk image: it is the whole machine at one instant — guest "
           "RAM, the vCPU's registers, the interrupt controller, timers and device state. A VM "
           "restored from it does not boot. Its kernel, its processes and its files in RAM go "
           "on from that instant."),
        md("## Put some state in the guest's memory\n"
           "The guest's root filesystem is an initramfs and its `/tmp` is tmpfs: both live in "
           "RAM. So a file in `/tmp` and a running process are both just *memory*, on no disk "
           "at all. We boot a VM, write a file, and start a background script that counts, "
           "ten times a second, into `/tmp/count`."),
        code("import os\n"
             "import shutil\n"
             "import statistics\n"
             "import subprocess\n"
             "import tempfile\n"
             "import time\n"
             "from pathlib import Path\n"
             "from supermachine_jupyter import Image, VmConfig\n\n"
             "workdir = Path(tempfile.mkdtemp(prefix=\"nb06-\"))\n"
             "image = Image.default()\n"
             "source = image.start(VmConfig(name=\"source\", engine=\"qemu\"))\n"
             "print(source)\n\n"
             "source.write_file(\"/tmp/counter.sh\",\n"
             "                  \"i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done\\n\")\n"
             "source.run(\"echo 'written before the snapshot' > /tmp/note; \"\n"
             "           \"sh /tmp/counter.sh >/dev/null 2>&1 &\")\n"
             "time.sleep(1)\n"
             "print(source.run(\"cat /tmp/note; echo count=$(cat /tmp/count); ps | grep '[c]ounter'\").stdout)"),
        md("## Take the snapshot\n"
           "`vm.snapshot(path)` pauses the guest, saves its state and lets it run on: the "
           "source VM is not harmed. The result is a directory:"),
        code("before = source.run(\"cat /tmp/count\").stdout.strip()\n"
             "snap = source.snapshot(workdir / \"snap\")\n"
             "after = source.run(\"cat /tmp/count\").stdout.strip()\n"
             "print(snap)\n"
             "print(f\"guest paused for {snap.header['engine_state']['paused_seconds'] * 1000:.0f} ms; \"\n"
             "      f\"count {before} before the snapshot, {after} after (the source runs on)\\n\")\n"
             "def size(n):\n"
             "    return f\"{n / 2**20:.1f} MiB\" if n >= 2**20 else f\"{n / 1024:.1f} KiB\"\n\n\n"
             "for file in sorted(snap.path.iterdir()):\n"
             "    st = file.stat()\n"
             "    print(f\"{file.name:22} size {size(st.st_size):>9}, \"\n"
             "          f\"allocated on the host {size(st.st_blocks * 512):>9}\")"),
        md("- `qemu-ram.img` is the guest's RAM, byte for byte: 256 MiB long, but **sparse**: "
           "only the pages the guest has touched are stored.\n"
           "- `qemu-state.migration` is QEMU's device state (vCPU registers, irqchip, timers, "
           "virtio queues), a few tens of KiB.\n"
           "- `header` records the engine, QEMU version, config, kernel and initramfs (with "
           "their SHA-256) and a size and digest for every other file, and ends with its own "
           "checksum. Everything is checked before a restore runs the guest."),
        md("## Two VMs from one snapshot\n"
           "`Image.from_snapshot(path)` reads and checks the header; `.start(config)` "
           "restores. The config names the new VM; the hardware (memory, vCPUs, volumes) is "
           "the snapshot's. After the restore the host gives the guest its new hostname, "
           "fresh entropy and the current time (its clock stood still while the snapshot sat "
           "on disk)."),
        code("snap_image = Image.from_snapshot(snap.path)\n"
             "print(snap_image)\n"
             "clones = []\n"
             "for name in (\"clone-a\", \"clone-b\"):\n"
             "    vm = snap_image.start(VmConfig(name=name))\n"
             "    clones.append(vm)\n"
             "    print(f\"\\n{vm.name}: restored in {vm.boot_seconds:.2f} s from {vm.restored_from}\")\n"
             "    print(vm.run(\"echo hostname=$(hostname); cat /tmp/note; ps | grep '[c]ounter'; \"\n"
             "                 \"echo count=$(cat /tmp/count); sleep 1; echo one second later: $(cat /tmp/count)\"\n"
             "                 ).stdout, end=\"\")\n"
             "clone_a, clone_b = clones"),
        md("Both clones found the file and the **same process** (same PID) that the source "
           "started. Each one's count starts a little past the value the snapshot caught "
           "(between the two printed above: the clone has run since its restore) and goes on "
           "counting. `clone-b` was restored a second after `clone-a`, from the same instant."),
        md("## Independent from here on\n"
           "Now we change one clone: write a file in `clone-a` and stop its counter. Nothing of "
           "this reaches `clone-b` or the source:"),
        code("counter_pid = clone_a.run(\"ps | grep '[c]ounter'\").stdout.split()[0]\n"
             "clone_a.run(f\"echo 'only in clone-a' > /tmp/mine; kill {counter_pid}\")\n"
             "check = (\"[ -e /tmp/mine ] && cat /tmp/mine || echo 'no /tmp/mine'; \"\n"
             "         \"a=$(cat /tmp/count); sleep 0.5; echo \\\"counter: $a → $(cat /tmp/count)\\\"\")\n"
             "for vm in (source, clone_a, clone_b):\n"
             "    print(f\"{vm.name:8}\", \" · \".join(vm.run(check).stdout.splitlines()))"),
        md("`clone-a`'s counter stands still, the others count on; the source is ahead, "
           "because it kept running while the snapshot was saved and restored."),
        md("## Shared memory: copy-on-write\n"
           "Each restored QEMU maps `qemu-ram.img` **privately** (`memory-backend-file` with "
           "`share=off`, that is `MAP_PRIVATE`). A page the guest only reads comes from the "
           "host's page cache of that file: **one copy for every VM restored from the "
           "snapshot**. A page the guest writes is copied first, for that VM alone "
           "(copy-on-write) — which is also why `clone-a`'s writes never reach `clone-b`, nor "
           "the file.\n\n"
           "Two ways to count a process's memory, from `/proc/PID/smaps_rollup`:\n\n"
           "- **RSS** counts every page the process has mapped, shared or not: two clones "
           "sharing a page both count it in full;\n"
           "- **PSS** (proportional set size) divides each shared page among the processes "
           "that map it: summed over processes, it counts what the host really spends."),
        code("def memory_mib(vm):\n"
             "    \"\"\"RSS, PSS and private (anonymous) memory of the VM's QEMU process, in MiB.\"\"\"\n"
             "    total = {\"Rss\": 0, \"Pss\": 0, \"Anonymous\": 0}\n"
             "    for pid in vm.instance.process_ids():\n"
             "        with open(f\"/proc/{pid}/smaps_rollup\") as rollup:\n"
             "            for line in rollup:\n"
             "                key = line.split(\":\")[0]\n"
             "                if key in total:\n"
             "                    total[key] += int(line.split()[1]) / 1024\n"
             "    return total\n\n\n"
             "print(f\"{'VM':8} {'RSS':>8} {'PSS':>8} {'anonymous':>10}\")\n"
             "sums = {\"Rss\": 0, \"Pss\": 0}\n"
             "for vm in (clone_a, clone_b):\n"
             "    m = memory_mib(vm)\n"
             "    sums = {key: sums[key] + m[key] for key in sums}\n"
             "    print(f\"{vm.name:8} {m['Rss']:4.0f} MiB {m['Pss']:4.0f} MiB {m['Anonymous']:6.0f} MiB\")\n"
             "print(f\"{'2 clones':8} {sums['Rss']:4.0f} MiB {sums['Pss']:4.0f} MiB\")\n"
             "print(f\"the clones share {sums['Rss'] - sums['Pss']:.0f} MiB that RSS counts twice\")"),
        md("*Anonymous* is what each clone wrote since its restore (plus QEMU's own heap): "
           "its private copies. With five clones the saving grows: the README's benchmark "
           "measured 283 MiB RSS but 141 MiB PSS for five restores of one snapshot, against "
           "459 MiB PSS for five cold-booted VMs.\n\n"
           "That is all we need from these three VMs:"),
        code("for vm in (source, clone_a, clone_b):\n"
             "    vm.stop()\n"
             "print([vm.state for vm in (source, clone_a, clone_b)])"),
        md("## Restore vs cold boot, measured here\n"
           "What a user waits for: from the call that starts a VM to the first byte of output "
           "of a command in it (`echo hi`). Three of each, one after the other. A cold boot "
           "runs the kernel and init under TCG; a restore checks the snapshot, starts QEMU, "
           "loads the state and lets the guest go on."),
        code("def start_to_first_output(start):\n"
             "    \"\"\"Seconds from calling start() to the first byte `echo hi` prints in the new VM.\"\"\"\n"
             "    began = time.monotonic()\n"
             "    vm = start()\n"
             "    first = None\n"
             "    for event in vm.exec(argv=[\"echo\", \"hi\"]):\n"
             "        if first is None and getattr(event, \"data\", None):\n"
             "            first = time.monotonic() - began\n"
             "    vm.stop()\n"
             "    return first, vm\n\n\n"
             "cold, restored = [], []\n"
             "for run in range(1, 4):\n"
             "    seconds, _ = start_to_first_output(lambda: image.start(VmConfig(engine=\"qemu\")))\n"
             "    cold.append(seconds)\n"
             "    seconds, last = start_to_first_output(lambda: snap_image.start(VmConfig()))\n"
             "    restored.append(seconds)\n"
             "    print(f\"run {run}: cold boot {cold[-1]:.2f} s · restore {restored[-1]:.2f} s\")\n"
             "print(f\"median: cold boot {statistics.median(cold):.2f} s · restore \"\n"
             "      f\"{statistics.median(restored):.2f} s \"\n"
             "      f\"({statistics.median(cold) / statistics.median(restored):.0f}x faster)\")"),
        md("Where a restore's time goes: `vm.restore_timings` gives the seconds from the start "
           "of the restore to each stage (the RAM digests are checked in a thread while QEMU "
           "loads the state, and the guest only runs once they match):"),
        code("for stage, seconds in last.restore_timings.items():\n"
             "    print(f\"{stage:16} {seconds * 1000:6.1f} ms\")"),
        md("## `restore_timeout`\n"
           "A restore waits at most `VmConfig.restore_timeout` seconds (default 10) for QEMU "
           "to load the state and the guest's agent to answer. Past it, the half-restored VM "
           "is stopped and `SnapshotTimeoutError` says which stage was too slow. A "
           "millisecond is far too short:"),
        code("from supermachine_jupyter.snapshots import SnapshotError, SnapshotTimeoutError\n\n"
             "try:\n"
             "    snap_image.start(VmConfig(name=\"too-quick\", restore_timeout=0.001))\n"
             "except SnapshotTimeoutError as error:\n"
             "    print(f\"{type(error).__name__}: {error}\")"),
        md("## Damaged snapshots are refused\n"
           "A snapshot is a file set that can be cut short by a full disk or changed by "
           "mistake; restoring a wrong RAM image would run a guest with garbage memory. So "
           "every file is checked against the header, and the header against its own "
           "checksum. We damage three copies of our snapshot (`cp --sparse=always` keeps the "
           "RAM file sparse) in three ways:"),
        code("def damaged_copy(name, damage):\n"
             "    copy = workdir / name\n"
             "    subprocess.run([\"cp\", \"-r\", \"--sparse=always\", str(snap.path), str(copy)], check=True)\n"
             "    damage(copy)\n"
             "    return copy\n\n\n"
             "def flip_header_bytes(path):\n"
             "    header = bytearray((path / \"header\").read_bytes())\n"
             "    for i in range(40, 44):              # inside the header's JSON line\n"
             "        header[i] ^= 0xFF\n"
             "    (path / \"header\").write_bytes(header)\n\n\n"
             "def truncate_ram(path):\n"
             "    os.truncate(path / \"qemu-ram.img\", 128 * 2**20)\n\n\n"
             "def flip_one_ram_byte(path):\n"
             "    with open(path / \"qemu-ram.img\", \"r+b\") as ram:\n"
             "        ram.seek(2**20)\n"
             "        byte = ram.read(1)[0]\n"
             "        ram.seek(2**20)\n"
             "        ram.write(bytes([byte ^ 0xFF]))\n\n\n"
             "for damage in (flip_header_bytes, truncate_ram, flip_one_ram_byte):\n"
             "    try:\n"
             "        vm = Image.from_snapshot(damaged_copy(damage.__name__, damage)).start(VmConfig())\n"
             "        vm.stop()\n"
             "        print(f\"{damage.__name__}: restored anyway!\")\n"
             "    except SnapshotError as error:\n"
             "        print(f\"{damage.__name__}:\\n  {type(error).__name__}: {error}\")"),
        md("The first two are caught by `Image.from_snapshot` before any engine starts. The "
           "flipped RAM byte needs the file's digest; the restore computes it while QEMU "
           "loads, and stops that QEMU before the guest ever runs."),
        md("## In cells: `--snapshot` and `--from`\n"
           "`%%vm --name a --snapshot s1` runs the cell in VM `a`, then saves `a` as the named "
           "snapshot `s1` (kept in the user cache, under `snapshots/named/`). `%%vm --from s1` "
           "starts a cell's VM from it instead of booting. `%vm snapshots` lists them."),
        code("%load_ext supermachine_jupyter"),
        code("%%vm --name a --snapshot s1\n"
             "echo \"made in VM $(hostname)\" > /tmp/origin\n"
             "sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/ticks; sleep 0.1; done' >/dev/null 2>&1 &\n"
             "echo \"a is set up\""),
        code("%%vm --name b --from s1\n"
             "hostname\n"
             "cat /tmp/origin\n"
             "echo \"ticks: $(cat /tmp/ticks), a second later: $(sleep 1; cat /tmp/ticks)\""),
        code("%vm snapshots"),
        code("%vm stop a b"),
        md("## The pre-booted snapshot behind every `%%vm` cell\n"
           "Look at the status line of the `--name a` cell: it says `restore`, not `boot`, "
           "although `a` came from no snapshot of ours (on a machine where no `%%vm` cell has "
           "run before, it says `boot`: read on). Every `%%vm` cell whose VM has no "
           "volumes and no mounts starts from a **pre-booted snapshot** of the default image: "
           "a VM that booted and has run nothing yet. It is kept in the user cache, one per "
           "hardware shape (keyed by kernel, initramfs, memory, vCPUs, balloon, engine and its "
           "version, and format version).\n\n"
           "- The **first** start of a shape boots as usual, then snapshots that fresh VM "
           "(the guest pauses for a few tens of milliseconds, before it runs anything) and "
           "finishes writing the snapshot in a background thread.\n"
           "- **Later** starts restore it. As every one of them starts from the same clean "
           "instant, no state leaks from one cell's VM to the next.\n\n"
           "`%config VmMagics.snapshot_cache = False` (or `SUPERMACHINE_SNAPSHOT_CACHE=0`) "
           "turns it off. From Python it is `image.start(config, snapshot_cache=True)`. To "
           "watch the first start happen, we use a memory size of our own and empty its cache "
           "entry:"),
        code("from supermachine_jupyter.snapshots import cache, store\n\n"
             "config = VmConfig(memory_mib=160, engine=\"qemu\")\n"
             "cached = store.snapshots_dir() / f\"default-{cache.default_snapshot_key(image, config)}\"\n"
             "shutil.rmtree(cached, ignore_errors=True)\n"
             "for start in range(1, 4):\n"
             "    began = time.monotonic()\n"
             "    with image.start(config, snapshot_cache=True) as vm:\n"
             "        vm.run(\"true\")\n"
             "        took = time.monotonic() - began\n"
             "        how = (f\"restored from {vm.restored_from.name}\" if vm.restored_from\n"
             "               else \"booted, and saved the pre-booted snapshot\")\n"
             "        print(f\"start {start}: first command done after {took:.2f} s: {how}\")\n"
             "        cache.wait_for_background()    # let the first one finish writing it"),
        md("## The same on the native core\n"
           "The project's own KVM core writes its own snapshot format: `state.bin` holds the "
           "vCPUs, the interrupt controllers, the clock, the UART and every virtio device "
           "(its queues' positions and its own state); `memory.bin` is guest RAM, which "
           "restores map copy-on-write (`MAP_PRIVATE`). The agent's vsock connection cannot "
           "survive a restore (its host side belonged to the old VM), so the core sends the "
           "guest a *transport reset* and the host connects anew, as Firecracker does.\n\n"
           "Where KVM is emulated, as here, Linux cannot boot on the native core, so this "
           "section runs the `agent` **probe guest**: a tiny freestanding guest that speaks "
           "the same agent protocol over the core's vsock device, with built-in commands "
           "instead of busybox. Its `count` keeps a counter in guest RAM."),
        code("from supermachine_jupyter.engines import native\n\n"
             "native_ok, native_why = native.available()\n"
             "if not native_ok:\n"
             "    print(f\"the native core cannot run here: {native_why}\")\n"
             "else:\n"
             "    probe = native.probe_path(\"agent\")\n"
             "    probe_image = Image(probe, probe, probe, description=\"agent probe guest\")\n"
             "    nsource = probe_image.start(VmConfig(engine=\"native\", memory_mib=64), name=\"nsource\")\n"
             "    print(\"nsource counts:\", nsource.run(\"count\").stdout.strip(), nsource.run(\"count\").stdout.strip())\n"
             "    nsnap = nsource.snapshot(workdir / \"native-snap\")\n"
             "    print(nsnap)\n"
             "    print(\"files:\", \", \".join(sorted(nsnap.header[\"files\"])))\n"
             "    print(\"nsource goes on:\", nsource.run(\"count\").stdout.strip())\n"
             "    nclones = [Image.from_snapshot(nsnap.path).start(name=f\"nclone-{c}\") for c in \"ab\"]\n"
             "    for clone in nclones:\n"
             "        counts = [clone.run(\"count\").stdout.strip() for _ in range(2)]\n"
             "        print(f\"{clone.name}: restored in {clone.boot_seconds * 1000:.0f} ms, counts \"\n"
             "              f\"{' '.join(counts)}\")\n"
             "    for vm in [nsource, *nclones]:\n"
             "        vm.stop()"),
        md("Both clones go on from the snapshot's counter (2), not from where the source has "
           "got to since, and neither sees the other's counting."),
        md("Clean up: the snapshot directories of this notebook, the named snapshot `s1` and "
           "our cache entry. (The VMs are all stopped already.)"),
        code("shutil.rmtree(workdir)\n"
             "shutil.rmtree(store.named_snapshot_path(\"s1\"), ignore_errors=True)\n"
             "shutil.rmtree(cached, ignore_errors=True)\n"
             "print(\"removed\", workdir, \"and the snapshot s1\")"),
        md("## Exercises\n"
           "1. Snapshot a VM whose guest holds a 100 MiB file in `/tmp`. How big is "
           "`qemu-ram.img` on the host now, and how long does a restore take? Why?\n"
           "2. Restore five clones of one snapshot and sum their RSS and PSS. Then make each "
           "clone write 20 MiB to `/tmp`: which of the two sums grows, and by how much?\n"
           "3. Start a VM with a volume (notebook 02), write to it, snapshot it, and write "
           "again. What does a clone find on the volume? And after the clone writes, what "
           "does the original volume file hold?\n"
           "4. Try `vm.snapshot` on a VM with a host mount (notebook 03), on each engine. "
           "Read the two errors: why can neither engine carry a mount across a restore?\n"
           "5. Find the smallest `restore_timeout` at which restores still succeed here. "
           "Which stage fails first when you go below it?"),
    ]


def balloon_in_class():
    md, code = new_markdown_cell, new_code_cell
    return [
        md("# 07 · Balloon in class: guest memory and host memory, side by side\n\n"
           "**What you will learn**\n"
           "- to run a live ballooning demonstration a room can follow: one chart with the "
           "guest's free and available memory **and** the host's resident memory;\n"
           "- why the two move together when the balloon inflates (the guest gives pages "
           "away, the host drops them), and why they do not when it deflates;\n"
           "- to read the chart's markers: one dashed line at each change of the target.\n\n"
           "**For the teacher.** Run the notebook before class once, so the guest image is "
           "built. In class, switch JupyterLab to the dark theme if the projector washes out "
           "white (Settings → Theme): the chart follows it. Every step below waits until the "
           "balloon has really moved, so you can talk over it. Notebook 01 explains the "
           "balloon's statistics field by field; here we only watch."),
        md("## One VM, one chart\n"
           "A 256 MiB guest with a balloon, and its `BalloonPanel`: it samples once a second "
           "on its own thread (ten minutes of history), so the chart keeps moving while the "
           "next cells run. The purple line is the **host's** side: the memory the engine "
           "holds resident for this VM (`vm.host_memory_bytes()`; the QEMU process's RSS, or "
           "the resident part of the guest RAM mapping with the native core)."),
        code("import time\n"
             "from supermachine_jupyter import Image, VmConfig\n"
             "from supermachine_jupyter.widgets import BalloonPanel\n\n"
             "vm = Image.default().start(VmConfig(memory_mib=256, balloon=True, engine=\"qemu\"))\n"
             "panel = BalloonPanel(vm)\n"
             "panel"),
        md("## Step 1 · The guest uses memory, the host pays for it\n"
           "A fresh guest has touched little of its RAM, and the host backs only touched "
           "pages. The guest writes 120 MiB into its tmpfs and deletes it: free again *inside* "
           "the guest, still resident *on the host*. Ask the room: which line moves?"),
        code("MiB = 1024 * 1024\n\n\n"
             "def host_mib():\n"
             "    return vm.host_memory_bytes() / MiB\n\n\n"
             "def guest_available_mib():\n"
             "    return vm.balloon_stats().available_memory / MiB\n\n\n"
             "before = host_mib()\n"
             "vm.run(\"dd if=/dev/zero of=/tmp/fill bs=1M count=120 2>/dev/null; rm /tmp/fill\")\n"
             "time.sleep(2)                      # the guest reports its statistics once a second\n"
             "touched = host_mib()\n"
             "print(f\"host resident: {before:.0f} MiB → {touched:.0f} MiB \"\n"
             "      f\"(+{touched - before:.0f} MiB); guest available: {guest_available_mib():.0f} MiB\")"),
        md("## Step 2 · Inflate: both sides fall together\n"
           "The balloon takes 64 MiB, then 128 MiB, from the guest. `settle` waits until the "
           "guest's driver has handed the pages over and prints both sides: the guest's "
           "available memory and the host's resident memory fall by about the same amount."),
        code("def settle(target_mib, seconds=60):\n"
             "    \"\"\"Set the balloon to `target_mib` and wait until the guest has followed.\"\"\"\n"
             "    vm.set_balloon_target(target_mib)\n"
             "    deadline = time.monotonic() + seconds\n"
             "    while vm.balloon_stats().actual_mib != target_mib and time.monotonic() < deadline:\n"
             "        time.sleep(0.5)\n"
             "    time.sleep(2.5)                 # two more samples on the chart\n"
             "    print(f\"balloon {vm.balloon_stats().actual_mib:3} MiB · guest available \"\n"
             "          f\"{guest_available_mib():4.0f} MiB · host resident {host_mib():4.0f} MiB\")\n\n\n"
             "available_before, host_before = guest_available_mib(), host_mib()\n"
             "settle(64)\n"
             "settle(128)\n"
             "guest_fell = available_before - guest_available_mib()\n"
             "host_fell = host_before - host_mib()\n"
             "print(f\"the balloon took 128 MiB: guest available fell by {guest_fell:.0f} MiB, \"\n"
             "      f\"host resident fell by {host_fell:.0f} MiB\")"),
        md("## Step 3 · Deflate: the guest gets it back, the host does not pay yet\n"
           "Giving the pages back is instant for the guest, but the host backs a page again "
           "only when the guest writes to it: the purple line stays down."),
        code("settle(0)\n"
             "print(f\"after deflating: host resident {host_mib():.0f} MiB \"\n"
             "      f\"(it was {touched:.0f} MiB before the balloon)\")"),
        md("## The whole lesson in one picture\n"
           "The live panel above keeps moving; this is a still copy of its chart, stored "
           "with the notebook (it renders anywhere, GitHub included). Each dashed line is a "
           "change of the target."),
        code("from IPython.display import HTML, display\n\n"
             "display(HTML(panel.chart.value))\n"
             "print(\"target changes marked:\", [target for _, target in panel.markers])\n"
             "print(\"samples charted:\", len(panel.history))"),
        code("vm.stop()\nprint(vm.state)"),
        md("## Exercises\n"
           "1. Inflate to 200 MiB. What happens to the guest's available memory, and to "
           "the balloon's `actual_mib`? Try `vm.run(\"free -m\")`.\n"
           "2. After deflating, make the guest write 120 MiB again. Which line moves now, "
           "and by how much?\n"
           "3. Open the **MicroVMs** sidebar and the status bar while this runs: where do you "
           "see the host memory there? Set the balloon from the sidebar's card and watch "
           "the panel's status line and its markers.\n"
           "4. Why is the host's resident memory larger than what the guest uses, even with "
           "a full balloon? (Hint: what else lives in the engine process?)"),
    ]


BUILDERS = {"00-hello-vm": hello_vm, "01-memory-and-balloon": memory_and_balloon,
            "02-volumes": volumes, "03-host-mounts": host_mounts,
            "04-widgets-dashboard": widgets_dashboard, "05-engines": engines,
            "06-snapshots": snapshots, "07-balloon-in-class": balloon_in_class}


def _same_cells(path: Path, cells) -> bool:
    if not path.exists():
        return False
    committed = nbformat.read(path, as_version=4)
    return [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in cells]


def main(argv):
    force = "--force" in argv
    names = [arg for arg in argv if arg != "--force"]
    unknown = [name for name in names if name not in BUILDERS]
    if unknown:
        sys.exit(f"unknown notebook(s) {', '.join(unknown)}; known: {', '.join(BUILDERS)}")
    NOTEBOOKS.mkdir(exist_ok=True)
    for name in names or BUILDERS:
        cells = BUILDERS[name]()
        path = NOTEBOOKS / f"{name}.ipynb"
        if not force and _same_cells(path, cells):
            print(f"unchanged notebooks/{name}.ipynb (stored outputs kept)")
            continue
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nbformat.write(nb, path)
        print(f"wrote notebooks/{name}.ipynb: execute it with "
              f"`python -m supermachine_jupyter notebook notebooks/{name}.ipynb --write`")


if __name__ == "__main__":
    main(sys.argv[1:])
