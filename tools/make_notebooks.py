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


BUILDERS = {"00-hello-vm": hello_vm}


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
