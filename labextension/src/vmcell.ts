/**
 * `%%vm` cells are shell scripts: highlight their body as shell, not as the kernel's Python.
 *
 * JupyterLab 4 highlights every cell with the kernel's language, cell magics included
 * (jupyterlab/jupyterlab#15324, #3869). This CodeMirror extension, added to every editor
 * through JupyterLab's editor-extension registry, watches the start of a Python cell: while
 * it begins with `%%vm`, a shell language with the highest precedence outranks the Python
 * one JupyterLab configured (CodeMirror's `language` facet takes the first, highest-precedence
 * value), so the body gets shell keywords, `$VAR`s and strings; when the `%%vm` goes, so does
 * the shell. Every other cell and editor keeps its language.
 *
 * The shell language is JupyterLab's own (its language registry loads the legacy shell mode
 * on first use), so its token styles match a `.sh` file's and no CodeMirror module is
 * bundled twice: @codemirror/{state,view,language} are JupyterLab's shared singletons.
 */

import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import {
  EditorExtensionRegistry,
  IEditorExtensionRegistry,
  IEditorLanguageRegistry
} from '@jupyterlab/codemirror';
import type { CodeEditor } from '@jupyterlab/codeeditor';
import { Compartment, Extension, Prec, Text } from '@codemirror/state';
import { EditorView, ViewPlugin, ViewUpdate } from '@codemirror/view';

/** The cell magic this package registers (`%%vm [options]` on the first line). */
const VM_CELL_MAGIC = /^%%vm(\s|$)/;
/** The editors whose language can be Python: notebook and console cells of an IPython
 * kernel, and Python files. */
const PYTHON_MIME_TYPES = new Set(['text/x-ipython', 'text/x-python']);
/** Lines looked at for the magic: IPython drops leading blank lines before it looks. */
const MAX_LEADING_BLANK_LINES = 20;

/** Whether IPython would run `doc` as a `%%vm` cell: its first non-blank line starts with
 * `%%vm` (leading indentation and blank lines are dropped, as IPython's cleanup does). */
export function isVmCell(doc: Text): boolean {
  const lines = Math.min(doc.lines, MAX_LEADING_BLANK_LINES + 1);
  for (let n = 1; n <= lines; n++) {
    const text = doc.line(n).text.trim();
    if (text) {
      return VM_CELL_MAGIC.test(text);
    }
  }
  return false;
}

/** Keeps one editor's shell compartment in step with its first line and its MIME type. */
class VmCellLanguage {
  constructor(
    private readonly view: EditorView,
    private readonly compartment: Compartment,
    private readonly model: CodeEditor.IModel,
    private readonly shell: () => Promise<Extension | null>
  ) {
    model.mimeTypeChanged.connect(this.sync, this);
    this.sync();
  }

  update(update: ViewUpdate): void {
    if (update.docChanged) {
      this.sync();
    }
  }

  destroy(): void {
    this.destroyed = true;
    this.model.mimeTypeChanged.disconnect(this.sync, this);
  }

  /** Switch to shell or back when the answer changed. The switch is a transaction of its
   * own, dispatched after the promise settles: never from inside an update. */
  private sync(): void {
    const wanted = PYTHON_MIME_TYPES.has(this.model.mimeType) && isVmCell(this.view.state.doc);
    if (wanted === this.shown) {
      return;
    }
    this.shown = wanted;
    void this.shell().then(shell => {
      if (this.destroyed || this.shown !== wanted || (wanted && !shell)) {
        return; // closed, or changed again while the shell mode loaded
      }
      this.view.dispatch({
        effects: this.compartment.reconfigure(wanted && shell ? Prec.highest(shell) : [])
      });
    });
  }

  private shown = false;
  private destroyed = false;
}

export const vmCellHighlightPlugin: JupyterFrontEndPlugin<void> = {
  id: 'supermachine-jupyter:vm-cell-highlight',
  description: 'Highlights the body of a %%vm cell as shell.',
  autoStart: true,
  requires: [IEditorExtensionRegistry, IEditorLanguageRegistry],
  activate: (
    app: JupyterFrontEnd,
    extensions: IEditorExtensionRegistry,
    languages: IEditorLanguageRegistry
  ) => {
    let loading: Promise<Extension | null> | null = null;
    const shell = () =>
      (loading ??= languages.getLanguage('shell').then(language => language?.support ?? null));
    extensions.addExtension({
      name: 'supermachine-jupyter:vm-cell-highlight',
      factory: ({ model }) => {
        const compartment = new Compartment();
        return EditorExtensionRegistry.createImmutableExtension([
          compartment.of([]),
          ViewPlugin.define(view => new VmCellLanguage(view, compartment, model, shell))
        ]);
      }
    });
  }
};
