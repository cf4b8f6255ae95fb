# Development environment for litevfs (https://devenv.sh): what the build and the tests need.
{ pkgs, ... }:

{
  languages.rust.enable = true;

  packages = [
    pkgs.sqlite-interactive # the sqlite3 shell the demo and end-to-end tests drive
    pkgs.llvmPackages.libclang # bindgen, used by the sqlite-plugin VFS binding
    pkgs.pkg-config
  ];

  env.LIBCLANG_PATH = "${pkgs.llvmPackages.libclang.lib}/lib";

  languages.python = {
    enable = true;
    venv.enable = true;
    venv.requirements = ''
      apsw
      pytest
    '';
  };
}
