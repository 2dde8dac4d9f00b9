"""Write the teaching notebooks from their source here (cells as plain text, easy to review).

Run `python tools/make_notebooks.py` then `python -m supermachine_jupyter notebook
notebooks/NAME.ipynb --write` to store real outputs in the committed notebook.
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
             "    print(vm.run(\"echo 'written by the first VM' > /data/notes.txt; \"\n"
             "                 \"echo 'tmp file' > /tmp/lost.txt; sync\"))\n"
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
             "    print(vm.run(\"dd if=/dev/urandom of=/scratch/blob bs=1M count=8 2>/dev/null; sync\"))\n"
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


BUILDERS = {"00-hello-vm": hello_vm, "01-memory-and-balloon": memory_and_balloon,
            "02-volumes": volumes}


def main(names):
    NOTEBOOKS.mkdir(exist_ok=True)
    for name in names or BUILDERS:
        nb = new_notebook(cells=BUILDERS[name]())
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nbformat.write(nb, NOTEBOOKS / f"{name}.ipynb")
        print(f"wrote notebooks/{name}.ipynb")


if __name__ == "__main__":
    main(sys.argv[1:])
