# The shape of Nixpkgs' lib/minfeatures.nix (features, each with a description and a
# condition; `missing` is what this Nix lacks). Tests copy the fixture and raise minVersion to
# prove that bonsai stops at the gate with a one-line way past it.
let
  minVersion = "2.3";
  features = [
    {
      description = "the `nixVersion` builtin";
      condition = builtins ? nixVersion;
    }
    {
      description = "`builtins.nixVersion` reports at least ${minVersion}";
      condition = builtins ? nixVersion && builtins.compareVersions minVersion builtins.nixVersion != 1;
    }
  ];
  evaluated = builtins.partition ({ condition, ... }: condition) features;
in
{
  inherit minVersion;
  all = features;
  supported = evaluated.right;
  missing = evaluated.wrong;
}
